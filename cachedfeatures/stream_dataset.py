"""Caching the features of a stream (an iterable dataset) by sample key.

``CachedIterableDataset(source, module, store, key="__key__", decode=...)`` wraps any iterable
of records: WebDataset-style tar members, a Hugging Face ``datasets`` streaming dataset, a plain
``torch.utils.data.IterableDataset``. A record must give its sample's key cheaply (``key=``
names the field or is a callable); ``decode=`` turns a record into the sample and runs only for
misses, so a pass over cached keys reads records but never decodes them.

Rows live in a keyed entry of the feature store (:mod:`cachedfeatures.store.keyed_entry`, the
layout :func:`cachedfeatures.cached_module` uses), found by a 16-byte hash of the sample key
(:func:`cachedfeatures.format.row_keys.sample_key`). When a pass ends with every key of the
source cached, the entry records it (the keys' count and digest, the source's cheap state, the
rows in :data:`~cachedfeatures.format.names.STREAM_ROWS`); later passes then serve the cache
alone, shuffled chunk-aware, without opening the source.

The module runs where :meth:`CachedIterableDataset.__iter__` runs. :meth:`~CachedIterableDataset.loader`
keeps it in the main process (on the device) and lets DataLoader workers read records, look up
keys, read hits and decode misses, each worker its own split of the source.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, cast

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from cachedfeatures._version import __version__
from cachedfeatures.compute import hashing as _hashing
from cachedfeatures.compute.calls import Call, OutputSelection, describe_selection, parse_call, parse_output
from cachedfeatures.compute.fingerprint import (
    Fingerprint,
    callable_digest,
    module_fingerprint,
    options_json,
    qualified_name,
    source_state,
)
from cachedfeatures.compute.layout import InputKey, OutputLayout, SampleLayout, parse_input_key
from cachedfeatures.compute.runner import Collate, FeatureComputer
from cachedfeatures.compute.spot_check import (
    DEFAULT_SPOT_CHECK,
    compare_columns,
    parse_spot_check,
    precision_of,
    stale_error,
)
from cachedfeatures.errors import ArgumentTypeError, DuplicateKeyError, RowsNotCachedError
from cachedfeatures.format.names import ATTRS_KEY, STREAM_ROWS
from cachedfeatures.format.row_keys import KEY_ALGORITHM, KEY_BYTES, sample_key
from cachedfeatures.format.specs import ArraySpec
from cachedfeatures.parse import parse_choice, parse_device, parse_float_dtype, parse_positive_int
from cachedfeatures.pipeline.sampler import ChunkShuffleSampler
from cachedfeatures.pruning import KeyedBudget
from cachedfeatures.store.feature_store import (
    Compressor,
    Entry,
    FeatureStore,
    StoreLike,
    default_chunk_rows,
)
from cachedfeatures.store.keyed_entry import KeyedEntry
from cachedfeatures.units import parse_bytes

__all__ = ["CachedIterableDataset"]

logger = logging.getLogger(__name__)

KeyOf = str | int | Callable[[Any], Any]
CacheOnly = bool | Literal["auto"]
Split = Literal["records", "source"]
# Rows assumed for the default chunk size: a stream's length is not known before a pass.
_ASSUMED_ROWS = 1 << 20


@dataclasses.dataclass
class _Batch:
    """What a reader (the main process or a DataLoader worker) hands to the server for one batch.

    ``rows`` holds the row of each hit and -1 for each miss; ``columns`` every stored array's
    rows for the hits, in order; ``samples`` the decoded samples of the misses, in order;
    ``checks`` the positions (in the batch) of hits decoded again for a spot check, and
    ``check_samples`` their samples.
    """

    keys: list[bytes]
    names: list[str]
    rows: np.ndarray
    columns: dict[str, np.ndarray]
    samples: list[Any]
    checks: list[int]
    check_samples: list[Any]
    decodes: int
    cache_only: bool = False


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One pass, as fixed by the main process before it starts (travels to workers)."""

    epoch: int
    cache_only: bool
    rows: np.ndarray | None  # cache-only: every key's row, in chunk order
    expected: int  # keys expected in the pass (for the spot-check rate), 0 when unknown


class _Reader(IterableDataset[_Batch]):
    """Reads one pass: records in, batches of hits and decoded misses out (picklable)."""

    def __init__(self, owner: CachedIterableDataset, plan: _Plan, batch_size: int) -> None:
        self.owner = owner
        self.plan = plan
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[_Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        entry = self.owner._keyed(create=False)
        if self.plan.cache_only:
            if entry is None or self.plan.rows is None:
                raise RowsNotCachedError(f"entry {self.owner.entry_name} is gone; stream the source again.")
            yield from self._from_cache(entry, worker, workers)
            return
        yield from self._from_source(worker, workers)

    def _from_cache(self, entry: KeyedEntry, worker: int, workers: int) -> Iterator[_Batch]:
        rows = cast(np.ndarray, self.plan.rows)
        sampler = ChunkShuffleSampler(
            len(rows),
            entry.entry.chunk_rows,
            seed=self.owner.seed,
            shuffle=self.owner.shuffle,
            world_size=1,
            rank=0,
        )
        sampler.set_epoch(self.plan.epoch)
        order = rows[sampler.indices()]
        for number, start in enumerate(range(0, len(order), self.batch_size)):
            if number % workers != worker:
                continue
            chunk = order[start : start + self.batch_size]
            hit, columns = entry.read(chunk)
            if not hit.all():
                raise RowsNotCachedError(
                    f"{int((~hit).sum())} rows of entry {entry.name} were dropped (pruned or "
                    "unreadable) during a cache-only pass; pass cache_only=False (or 'auto') to "
                    "stream the source and compute them again."
                )
            yield _Batch([], [], chunk, columns, [], [], [], 0, cache_only=True)

    def _from_source(self, worker: int, workers: int) -> Iterator[_Batch]:
        owner = self.owner
        split_records = owner.split == "records" and workers > 1
        rng = np.random.default_rng([owner.seed, self.plan.epoch, worker, 7])
        rate = 0.0
        if owner.spot_check and self.plan.expected:
            rate = min(1.0, owner.spot_check / self.plan.expected)
        pending: list[Any] = []
        for position, record in enumerate(owner.source):
            if split_records and position % workers != worker:
                continue
            pending.append(record)
            if len(pending) == self.batch_size:
                yield self._batch(pending, rng, rate)
                pending = []
        if pending:
            yield self._batch(pending, rng, rate)

    def _batch(self, records: list[Any], rng: np.random.Generator, rate: float) -> _Batch:
        owner = self.owner
        names = [owner._name_of(record) for record in records]
        keys = [sample_key(name) for name in names]
        entry = owner._keyed(create=False)
        rows = np.full(len(keys), -1, dtype=np.int64)
        columns: dict[str, np.ndarray] = {}
        if entry is not None:
            found = entry.lookup(keys)
            known = np.flatnonzero(found >= 0)
            if len(known):
                hit, columns = entry.read(found[known])
                rows[known[hit]] = found[known[hit]]
        misses = np.flatnonzero(rows < 0)
        samples = [owner._decode(records[i]) for i in misses.tolist()]
        checks: list[int] = []
        if rate > 0:
            hits = np.flatnonzero(rows >= 0)
            checks = hits[rng.random(len(hits)) < rate].tolist()
        check_samples = [owner._decode(records[i]) for i in checks]
        return _Batch(keys, names, rows, columns, samples, checks, check_samples, len(samples) + len(checks))


class CachedIterableDataset(IterableDataset[Any]):
    """A stream of samples whose module outputs are cached by sample key.

    Iterating yields each sample of ``source`` (decoded) with the input replaced by the module's
    output, in the source's order; hits come from the store without decoding, misses run through
    the module in batches of ``batch_size``. Once a pass has ended with every key cached, later
    passes read the cache alone (``cache_only``), shuffled chunk by chunk.

    Args:
        source: an iterable of records (re-iterable: one pass per ``iter``).
        module: the frozen feature module (or a plain function of tensors).
        store: where the features live: a local path, a zarr Store (``None``: in memory).
        key: the sample key of a record: a field name or index (``"__key__"``, default), or a
            callable ``record -> str | bytes | int``. It must be cheap: it runs for hits too.
        decode: ``record -> sample``, run only for misses (and spot checks). Default: the
            record is the sample.
        input_key: the field of the sample that feeds the module (as in
            :class:`~cachedfeatures.CachedFeatureDataset`); the other fields are stored beside.
        batch_size: samples per module call, and per batch of :meth:`loader`. Default 64.
        device: where the module runs. Default ``"cpu"``.
        dtype: storage dtype for floating-point outputs (``None``: the module's).
        collate_fn: turns a list of inputs into the module's argument, as for ``CachedFeatureDataset``.
        autocast_dtype: run the module under autocast to this dtype, as for ``CachedFeatureDataset``.
        call: how the module is called on a batch, as for ``CachedFeatureDataset``.
        output: what to cache from the module's output, as for ``CachedFeatureDataset``.
        module_version: stands in for hashing the module's weights and code.
        source_version: names the source in the entry key instead of its class and own state
            (file lists, small values; file names only, not sizes or mtimes).
        spot_check: about how many random hits per streamed pass are decoded and recomputed;
            a mismatch (a key whose content changed) raises ``StaleFeaturesError``. ``0`` off.
        max_bytes: budget for the bytes of the whole store (int or ``"2GB"``), as for
            ``CachedFeatureDataset``; over it whole chunks are dropped: of other entries first,
            then this entry's, most recently used first (a stable subset stays cached).
        chunk_rows: rows per chunk; default about 2 MiB, as for a dataset entry.
        compressor: a Zarr bytes-to-bytes codec, ``"default"`` (Blosc lz4) or ``None``.
        cache_only: ``"auto"`` (default): serve the cache alone once a pass ended with every key
            cached and the source's cheap state (file sizes and mtimes) is unchanged; ``True``:
            always the cache alone (``RowsNotCachedError`` if no pass was recorded); ``False``:
            always stream the source.
        shuffle: shuffle cache-only passes (chunks, then rows in windows of chunks). Default True.
        seed: seed of the cache-only order (per epoch) and of the spot checks.
        split: how DataLoader workers share the source: ``"records"`` (default): worker ``w`` of
            ``W`` takes records ``w, w + W, ...`` (each worker reads every record, cheaply, and
            decodes only its own); ``"source"``: the source splits itself by
            ``get_worker_info()`` (WebDataset, Hugging Face ``IterableDataset``).
    """

    def __init__(
        self,
        source: Iterable[Any],
        module: Callable[..., Any],
        store: StoreLike = None,
        *,
        key: KeyOf = "__key__",
        decode: Callable[[Any], Any] | None = None,
        input_key: InputKey = 0,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        collate_fn: Collate | None = None,
        autocast_dtype: torch.dtype | None = None,
        call: Call = "auto",
        output: OutputSelection | None = None,
        module_version: str | None = None,
        source_version: str | None = None,
        spot_check: int = DEFAULT_SPOT_CHECK,
        max_bytes: int | float | str | None = None,
        chunk_rows: int | None = None,
        compressor: Compressor = "default",
        cache_only: CacheOnly = "auto",
        shuffle: bool = True,
        seed: int = 0,
        split: Split = "records",
    ) -> None:
        if not isinstance(source, Iterable) or isinstance(source, Iterator):
            raise ArgumentTypeError(
                "Expected source to be a re-iterable of records (a list, a dataset, an object whose "
                f"__iter__ starts a new pass). Got {source!r}; an iterator or generator is spent "
                "after one pass: wrap its making in a class with __iter__."
            )
        if not (callable(key) or (isinstance(key, (str, int)) and not isinstance(key, bool))):
            raise ArgumentTypeError(
                f"Expected key to be a field name, an index or a callable record -> key. Got {key!r}."
            )
        if decode is not None and not callable(decode):
            raise ArgumentTypeError(
                f"Expected decode to be a callable record -> sample or None. Got {decode!r}."
            )
        if cache_only not in (True, False, "auto"):
            raise ArgumentTypeError(f"Expected cache_only to be True, False or 'auto'. Got {cache_only!r}.")
        self.source = source
        self.module = module
        self.key = key
        self.decode = decode
        self.input_key = parse_input_key(input_key)
        self.batch_size = parse_positive_int("batch_size", batch_size)
        self.device = parse_device(device)
        self.dtype = parse_float_dtype(dtype)
        self.spot_check = parse_spot_check(spot_check)
        self.max_bytes = None if max_bytes is None else parse_bytes(max_bytes)
        self.chunk_rows = None if chunk_rows is None else parse_positive_int("chunk_rows", chunk_rows)
        self.compressor = compressor
        self.cache_only: CacheOnly = cache_only
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.split: Split = parse_choice("split", split, ("records", "source"))
        self.store_location = store
        self._computer = FeatureComputer(
            module,
            self.device,
            self.dtype,
            collate_fn,
            autocast_dtype,
            parse_call(call),
            parse_output(output),
        )
        self._precision = precision_of(module, self.device, autocast_dtype)
        self.module_fingerprint = module_fingerprint(module, module_version)
        self.source_fingerprint = self._source_fingerprint(source_version)
        options: dict[str, Any] = {
            "kind": "stream",
            "key": callable_digest(key) if callable(key) else repr(key),
            "key_hash": KEY_ALGORITHM,
            "decode": None if decode is None else callable_digest(decode),
            "input_key": callable_digest(self.input_key)
            if callable(self.input_key)
            else repr(self.input_key),
            "dtype": None if self.dtype is None else str(self.dtype),
            "collate_fn": None if collate_fn is None else callable_digest(collate_fn),
            "autocast": None if autocast_dtype is None else str(autocast_dtype),
            "output": None if output is None else describe_selection(parse_output(output)),  # type: ignore[arg-type]
            "call": call,
        }
        self.options = options
        digest = _hashing.hash_strings(
            self.module_fingerprint.digest, self.source_fingerprint.digest, options_json(options)
        )
        self.entry_name = f"stream-{digest[:20]}"
        self.epoch = 0
        self.module_calls = 0  # batches run through the module, in this process
        self.decodes = 0  # records decoded (misses and spot checks), as reported by readers
        self.last_pass: Literal["source", "cache"] | None = None
        self._store: FeatureStore | None = None
        self._keyed_entry: KeyedEntry | None = None
        self._budget: KeyedBudget | None = None
        self._sample_layout: SampleLayout | None = None
        self._output_layout: OutputLayout | None = None

    # -- identity --------------------------------------------------------------------------------

    def _source_fingerprint(self, version: str | None) -> Fingerprint:
        name = qualified_name(self.source)
        if version is not None:
            digest = _hashing.hash_strings("stream", name, version)
            return Fingerprint(
                digest, f"stream {name} (version {version!r})", {"class": name, "version": version}
            )
        state, _, unhashed = source_state(self.source)
        digest = _hashing.hash_strings("stream", name, state)
        return Fingerprint(
            digest,
            f"stream {name}, state {state[:12]}, keyed by {self.key!r}",
            {"class": name, "state": state, "unhashed": unhashed[:20]},
        )

    def _source_state_now(self) -> str:
        """The source's cheap state with file sizes and mtimes: changes when a shard does."""
        return source_state(self.source)[1]

    def _name_of(self, record: Any) -> Any:
        if callable(self.key):
            return self.key(record)
        try:
            return record[self.key]
        except (KeyError, IndexError, TypeError) as error:
            fields = list(record.keys()) if isinstance(record, Mapping) else type(record).__name__
            raise ArgumentTypeError(
                f"Expected each record to hold its sample key under {self.key!r}. Got a record "
                f"with {fields}; pass key= the field that names the sample, or a callable."
            ) from error

    def _decode(self, record: Any) -> Any:
        return record if self.decode is None else self.decode(record)

    # -- the store -------------------------------------------------------------------------------

    def _open_store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore.open(self.store_location, mode="a")
        return self._store

    def _keyed(self, *, create: bool) -> KeyedEntry | None:
        """The entry, if it exists (this or another process created it)."""
        if self._keyed_entry is not None:
            return self._keyed_entry
        store = self._open_store()
        found = store.entry(self.entry_name)
        if found is None:
            return None
        self._load_layouts(found)
        self._keyed_entry = KeyedEntry(store, found)
        self._attach_budget(store, self._keyed_entry)
        return self._keyed_entry

    def _load_layouts(self, entry: Entry) -> None:
        meta = entry.meta
        specs = {spec.name: spec for spec in entry.specs}
        self._output_layout = OutputLayout.from_json(meta["outputs"])
        self._sample_layout = SampleLayout.from_json(meta["sample"], specs, self.input_key)

    def _create(self, sample: Any, raw: Any, batch_size: int) -> KeyedEntry:
        sample_layout = SampleLayout.from_sample(sample, self.input_key)
        output_layout = OutputLayout.from_output(raw, batch_size, self.dtype)
        specs: list[ArraySpec] = [*output_layout.arrays, *sample_layout.fields]
        row_nbytes = sum(spec.row_nbytes for spec in specs) + 16
        chunk_rows = self.chunk_rows or default_chunk_rows(row_nbytes, _ASSUMED_ROWS)
        meta = {
            "kind": "stream",
            "module": self.module_fingerprint.to_json(),
            "dataset": self.source_fingerprint.to_json(),
            "options": self.options,
            "sample": sample_layout.to_json(),
            "outputs": output_layout.to_json(),
            "library_version": __version__,
        }
        keyed = KeyedEntry.open(
            self._open_store(),
            self.entry_name,
            meta,
            specs,
            chunk_rows=chunk_rows,
            compressor=self.compressor,
        )
        self._load_layouts(keyed.entry)
        self._keyed_entry = keyed
        self._attach_budget(self._open_store(), keyed)
        return keyed

    def _attach_budget(self, store: FeatureStore, keyed: KeyedEntry) -> None:
        """The store-wide budget of ``max_bytes`` (other entries pruned first, then this one's
        chunks, most recently used first), checked after every append."""
        self._budget = None if self.max_bytes is None else KeyedBudget(store, keyed, self.max_bytes)

    @property
    def entry(self) -> Entry | None:
        """The store entry (``None`` before the first miss was stored): ``describe()``,
        ``to_xarray()``, ``info()`` as for any entry."""
        keyed = self._keyed(create=False)
        return None if keyed is None else keyed.entry

    def completed(self) -> dict[str, Any] | None:
        """The record of the last pass that ended with every key cached, or ``None``."""
        keyed = self._keyed(create=False)
        if keyed is None:
            return None
        keyed._reload()
        record = keyed.entry.meta.get("stream")
        return dict(record) if isinstance(record, Mapping) else None

    # -- passes ----------------------------------------------------------------------------------

    def _plan(self) -> _Plan:
        epoch = self.epoch
        self.epoch += 1
        record = self.completed() if self.cache_only is not False else None
        expected = int(record["keys"]) if record else 0
        if self.cache_only is not False:
            rows = self._cached_rows(record)
            usable = rows is not None and (
                self.cache_only is True
                or record is None
                or record.get("source_state") == self._source_state_now()
            )
            if usable:
                return _Plan(epoch, True, rows, expected)
            if self.cache_only is True:
                raise RowsNotCachedError(
                    f"cache_only=True, but entry {self.entry_name} holds no complete pass over the "
                    "source (or some of its rows were pruned). Iterate once with cache_only='auto' "
                    "or False so that every key is cached, then the cache serves alone."
                )
        if not expected:
            keyed = self._keyed(create=False)
            expected = 0 if keyed is None else keyed._next_row()
        return _Plan(epoch, False, None, expected)

    def _cached_rows(self, record: Mapping[str, Any] | None) -> np.ndarray | None:
        """Every key's row, sorted, if a complete pass was recorded and all are still valid."""
        keyed = self._keyed_entry
        if record is None or keyed is None:
            return None
        try:
            rows = np.asarray(cast("zarr.Array[Any]", keyed.entry.group[STREAM_ROWS])[:], dtype=np.int64)
        except KeyError:
            return None
        if len(rows) != int(record["keys"]) or (len(rows) and rows.max() >= keyed.entry.num_rows):
            return None
        if len(rows) and not np.asarray(keyed.entry.valid.oindex[rows], dtype=bool).all():
            return None  # pruned since: stream the source to fill the gaps
        return rows

    def __iter__(self) -> Iterator[Any]:
        """One pass, in this process: samples one by one (the module runs here)."""
        plan = self._plan()
        for columns in self._serve(
            iter(_Reader(self, plan, self.batch_size)), plan, record=get_worker_info() is None
        ):
            yield from self._build(columns)

    def loader(
        self,
        batch_size: int | None = None,
        *,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = default_collate,
        **loader_options: Any,
    ) -> Iterable[Any]:
        """One pass as batches: DataLoader workers read and decode, the module runs here.

        Each worker streams its own split of the source (see ``split``), looks its keys up, reads
        the hits and decodes the misses; this process runs the misses through the module on the
        device, stores them and collates. Batches hold ``batch_size`` samples (default the
        cache's), fewer at the end of each worker's split. ``collate_fn=None`` yields lists.
        Other options go to ``torch.utils.data.DataLoader``.
        """
        size = self.batch_size if batch_size is None else parse_positive_int("batch_size", batch_size)
        return _Pass(self, size, num_workers, collate_fn, loader_options)

    def _serve(
        self, batches: Iterator[_Batch], plan: _Plan, *, record: bool
    ) -> Iterator[dict[str, np.ndarray]]:
        """Compute and store the misses of each batch, spot-check, and yield its stored columns
        (every array's rows, in the batch's order).

        After the last batch, with every key cached and no duplicate, record the pass (when
        ``record``: a pass split between DataLoader workers by the caller sees one split each).
        """
        self.last_pass = "cache" if plan.cache_only else "source"
        seen: dict[bytes, int] = {}
        all_rows: list[np.ndarray] = []
        names_of: dict[bytes, Any] = {}
        for batch in batches:
            self.decodes += batch.decodes
            if batch.cache_only:
                yield batch.columns
                continue
            for key, name in zip(batch.keys, batch.names, strict=True):
                if key in seen:
                    first = names_of.get(key, "?")
                    raise DuplicateKeyError(
                        f"the source yielded sample key {name!r} twice in one pass (first as "
                        f"{first!r}); rows are stored by key, so keys must be unique. Pass key= a "
                        "callable that makes them unique (e.g. shard name + '/' + __key__). With "
                        "DataLoader workers and split='source', a source that does not split itself "
                        "by get_worker_info() yields every record in every worker: use split='records'."
                    )
                seen[key] = 1
                names_of[key] = name
            rows = batch.rows.copy()
            columns = batch.columns
            if batch.samples:
                rows, columns = self._compute_misses(batch, rows)
            if batch.checks:
                self._spot_check(batch, rows, columns)
            all_rows.append(rows)
            yield self._columns_at(batch, rows, columns)
        if record and not plan.cache_only and seen:
            self._record_pass(list(seen), np.concatenate(all_rows))

    def _compute_misses(self, batch: _Batch, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run the misses through the module, store them, and return every row's columns."""
        samples = batch.samples
        keyed = self._keyed(create=False)
        layout = self._sample_layout
        if layout is None:
            layout = SampleLayout.from_sample(samples[0], self.input_key)
        inputs = [layout.extract_input(sample) for sample in samples]
        raw = self._computer.run(inputs)
        self.module_calls += 1
        if keyed is None:
            keyed = self._create(samples[0], raw, len(samples))
        outputs, sample_layout = (
            cast(OutputLayout, self._output_layout),
            cast(SampleLayout, self._sample_layout),
        )
        split = outputs.split(raw, len(samples), self.dtype)
        fresh = {spec.name: spec.tensor_batch_to_numpy(split[spec.name]) for spec in outputs.arrays}
        fresh.update(sample_layout.field_values(samples))
        misses = np.flatnonzero(rows < 0)
        new_rows = keyed.append([batch.keys[i] for i in misses.tolist()], fresh)
        if self._budget is not None:
            self._budget.after_append(
                sum(column.nbytes for column in fresh.values()) + KEY_BYTES * len(misses)
            )
        rows[misses] = new_rows
        hits = np.flatnonzero(batch.rows >= 0)
        if not len(hits):
            return rows, fresh
        columns = {}
        for name, column in fresh.items():
            merged = np.empty((len(rows), *column.shape[1:]), dtype=column.dtype)
            merged[misses] = column
            merged[hits] = batch.columns[name]
            columns[name] = merged
        return rows, columns

    def _columns_at(
        self, batch: _Batch, rows: np.ndarray, columns: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Columns indexed by batch position (hits-only columns are packed)."""
        if len(next(iter(columns.values()))) == len(rows):
            return columns
        hits = np.flatnonzero(batch.rows >= 0)
        out = {}
        for name, column in columns.items():
            full = np.empty((len(rows), *column.shape[1:]), dtype=column.dtype)
            full[hits] = column
            out[name] = full
        return out

    def _spot_check(self, batch: _Batch, rows: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Recompute the checked hits and compare them with what the store served."""
        keyed = self._keyed(create=False)
        outputs, layout = self._output_layout, self._sample_layout
        if keyed is None or outputs is None or layout is None:
            return
        at = self._columns_at(batch, rows, columns)
        positions = np.asarray(batch.checks, dtype=np.int64)
        raw = self._computer.run([layout.extract_input(sample) for sample in batch.check_samples])
        split = outputs.split(raw, len(positions), self.dtype)
        recomputed = {spec.name: spec.tensor_batch_to_numpy(split[spec.name]) for spec in outputs.arrays}
        recomputed.update(layout.field_values(batch.check_samples))
        stored = {name: column[positions] for name, column in at.items()}
        specs = [*outputs.arrays, *layout.fields]
        mismatches = compare_columns(
            specs, rows[positions], stored, recomputed, [s.name for s in outputs.arrays], self._precision
        )
        if mismatches:
            raise stale_error(keyed.name, self._open_store().backend, len(positions), mismatches)

    def _layouts(self) -> tuple[OutputLayout, SampleLayout]:
        missing = self._output_layout is None or self._sample_layout is None
        if missing and self._keyed(create=False) is None:
            raise RowsNotCachedError(f"entry {self.entry_name} is gone; stream the source again.")
        return cast(OutputLayout, self._output_layout), cast(SampleLayout, self._sample_layout)

    def _build(self, columns: dict[str, np.ndarray]) -> list[Any]:
        """The samples of a batch of stored columns."""
        if not columns or len(next(iter(columns.values()))) == 0:
            return []
        outputs, layout = self._layouts()
        tensors = {spec.name: spec.numpy_to_tensor(columns[spec.name]) for spec in outputs.arrays}
        fields = {spec.name: columns[spec.name] for spec in layout.fields}
        return layout.build_many(outputs.unbind(tensors), fields)

    def _collate(self, columns: dict[str, np.ndarray]) -> Any:
        """``default_collate`` of the batch's samples, made straight from the stored columns
        (no sample is built and stacked again): the same types, dtypes and values."""
        outputs, layout = self._layouts()
        tensors = {spec.name: spec.numpy_to_tensor(columns[spec.name]) for spec in outputs.arrays}
        features = outputs.join(tensors)
        if isinstance(features, tuple):
            features = list(features)  # default_collate turns tuples into lists
        fields = {spec.name: _collated_field(spec, columns[spec.name]) for spec in layout.fields}
        return _collate_template(layout.template, features, fields)

    def _record_pass(self, keys: Sequence[bytes], rows: np.ndarray) -> None:
        """Record a pass that ended with every key cached: the cache may then serve alone."""
        keyed = self._keyed(create=False)
        if keyed is None:
            return
        keyed._reload()
        if (
            rows.max() >= keyed.entry.num_rows
            or not np.asarray(keyed.entry.valid.oindex[rows], dtype=bool).all()
        ):
            return  # some rows were dropped by the budget: the cache cannot serve alone
        ordered = np.sort(rows)
        group = keyed._fresh_group()
        with keyed.store.locks.entry(keyed.name):
            array = group.create_array(
                STREAM_ROWS,
                shape=ordered.shape,
                chunks=(max(1, len(ordered)),),
                dtype="int64",
                dimension_names=("stream_key",),
                overwrite=True,
            )
            array[:] = ordered
            meta = dict(cast(Mapping[str, Any], group.attrs[ATTRS_KEY]))
            meta["stream"] = {
                "keys": len(keys),
                "keys_digest": _hashing.hash_strings(*sorted(key.hex() for key in keys)),
                "source_state": self._source_state_now(),
                "epoch": self.epoch - 1,
            }
            group.attrs[ATTRS_KEY] = meta
        keyed._reload()

    # -- pickling: workers get the source and the options, not the open store --------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        state["_keyed_entry"] = None
        state["_budget"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"CachedIterableDataset({qualified_name(self.source)}, entry={self.entry_name}, "
            f"store={self.store_location!r}, cache_only={self.cache_only!r})"
        )


class _Pass:
    """One pass of :meth:`CachedIterableDataset.loader` (iterate it once per epoch)."""

    def __init__(
        self,
        owner: CachedIterableDataset,
        batch_size: int,
        num_workers: int,
        collate_fn: Callable[[list[Any]], Any] | None,
        loader_options: Mapping[str, Any],
    ) -> None:
        self.owner = owner
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.loader_options = dict(loader_options)

    def __iter__(self) -> Iterator[Any]:
        owner = self.owner
        plan = owner._plan()
        reader = _Reader(owner, plan, self.batch_size)
        batches: Iterator[_Batch]
        if self.num_workers == 0:
            batches = iter(reader)
        else:
            loader = DataLoader(
                reader,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=cast(Callable[[list[Any]], Any], _identity),
                **self.loader_options,
            )
            batches = iter(loader)
        for columns in owner._serve(batches, plan, record=True):
            if not columns or len(next(iter(columns.values()))) == 0:
                continue
            if self.collate_fn is default_collate:
                yield owner._collate(columns)
                continue
            samples = owner._build(columns)
            yield samples if self.collate_fn is None else self.collate_fn(samples)


def _identity(batch: _Batch) -> _Batch:
    return batch


def _collated_field(spec: ArraySpec, column: np.ndarray) -> Any:
    """A passthrough field's column as ``default_collate`` makes it from the field's values."""
    if spec.kind == "tensor":
        return spec.numpy_to_tensor(column)
    if spec.kind == "str":
        return column.tolist()
    dtype = {"int": np.int64, "float": np.float64, "bool": np.bool_}.get(spec.kind)
    return torch.from_numpy(
        np.ascontiguousarray(column if dtype is None else column.astype(dtype, copy=False))
    )


def _collate_template(node: Mapping[str, Any], features: Any, fields: Mapping[str, Any]) -> Any:
    kind = node["kind"]
    if kind == "input":
        return features
    if kind == "field":
        return fields[node["name"]]
    items = [_collate_template(item, features, fields) for item in node["items"]]
    if kind == "dict":
        return dict(zip(node["keys"], items, strict=True))
    return items  # default_collate makes a list of a tuple or list sample
