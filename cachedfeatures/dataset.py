"""``CachedFeatureDataset``: a map-style dataset that serves a frozen module's features from
a Zarr store, and computes (in batches) and stores the ones it does not have yet.

A facade: the keyword options are validated into a :class:`~cachedfeatures.options.DatasetOptions`,
the store and entry are held by an :class:`~cachedfeatures.binding.EntryBinding` (which reads,
writes and records access), and the module runs in a :class:`~cachedfeatures.compute.runner.FeatureComputer`.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
    default_collate,
    get_worker_info,
)

from cachedfeatures._version import __version__
from cachedfeatures.binding import EntryBinding, NewEntry, OpenedStore, open_store
from cachedfeatures.compute.calls import Call, OutputSelection
from cachedfeatures.compute.fingerprint import (
    DatasetProbe,
    dataset_fingerprint,
    entry_id,
    module_fingerprint,
    qualified_name,
)
from cachedfeatures.compute.layout import (
    FieldNames,
    InputKey,
    OutputLayout,
    SampleLayout,
    ragged_positions,
    renamed_fields,
)
from cachedfeatures.compute.modes import mode_dependent_submodules, training_mode_message
from cachedfeatures.compute.probe import explain_probe_failure
from cachedfeatures.compute.runner import Collate, FeatureComputer
from cachedfeatures.compute.spot_check import (
    DEFAULT_SPOT_CHECK,
    SpotCheckState,
    compare_columns,
    parse_spot_check,
    precision_of,
    stale_error,
)
from cachedfeatures.compute.state_hash import module_state_digests
from cachedfeatures.compute.steps import LoadedRows, RowLoader, compute_loaded
from cachedfeatures.compute.views import Generator, Schedule, ViewedSamples, ViewSchedule
from cachedfeatures.errors import (
    CacheError,
    DeviceInWorkerError,
    FingerprintWarning,
    InvalidArgumentError,
    NonDeterministicDatasetError,
    TrainingModeError,
)
from cachedfeatures.format.specs import ArraySpec
from cachedfeatures.options import DatasetOptions
from cachedfeatures.parse import expected, parse_int, parse_positive_int
from cachedfeatures.pipeline.collate import BatchAssembler, PadCollate, carry_batch
from cachedfeatures.pipeline.nodes import Loader, WorkerMethod
from cachedfeatures.pipeline.prefill import PrefillResult, prefill
from cachedfeatures.pipeline.resident import DeviceFeatures
from cachedfeatures.pipeline.sampler import EpochBatchSampler
from cachedfeatures.pruning import Policy
from cachedfeatures.reader.chunk_reader import ReadRoute
from cachedfeatures.store.faults import WriteGuard
from cachedfeatures.store.feature_store import (
    Compressor,
    Entry,
    FeatureStore,
    StoreLike,
    default_chunk_rows,
)
from cachedfeatures.store.integrity import CheckedReader
from cachedfeatures.store.ownership import ChunkOwnership

__all__ = ["CachedFeatureDataset"]

_MAX_EPOCH = 2**62

logger = logging.getLogger(__name__)


class CachedFeatureDataset(Dataset[Any]):
    """A dataset whose samples carry a frozen module's features instead of its raw input.

    ``cached[i]`` has the structure of ``dataset[i]`` with the ``input_key`` field replaced by
    ``module(input)``. Hits come from the store without calling ``dataset[i]``: the sample's
    other fields (labels, ids, ...) are stored beside the features. Misses are loaded, run
    through the module in batches of ``batch_size`` on ``device``, stored, and served.

    Args:
        dataset: any map-style dataset (``len`` and ``__getitem__``) of tensors, tuples,
            lists or dicts.
        module: the frozen feature module, in eval mode, called on a collated batch.
        store: a local path, a ``zarr`` Store, or ``None`` for an in-memory store.
        input_key: the field that feeds the module: an index, a dict key, or a callable
            ``sample -> input``. Default ``0`` (a bare tensor sample is its own input).
        batch_size: misses go through the module in batches of at most this many. Default 256.
        device: where the module runs (``"cpu"``, ``"cuda"``, ``torch.device``). Default CPU.
        dtype: storage dtype for floating-point outputs (e.g. ``torch.float16``); default the
            module's output dtype.
        compressor: a Zarr bytes-to-bytes codec, ``"default"`` (Blosc lz4 with bit shuffle)
            or ``None`` for raw chunks. Used when the entry is created.
        chunk_rows: rows per chunk; default gives chunks of about 2 MiB.
        collate_fn: turns a list of inputs into the module's argument; default stacks them.
        module_version: a string that stands in for hashing the module's weights and code;
            change it whenever the module changes.
        dataset_version: a string that stands in for hashing the dataset's state and probing
            its samples; change it whenever the data change.
        allow_nondeterministic: cache a dataset whose inputs change from load to load (random
            augmentation), freezing one draw. Default ``False``, which raises instead. It also
            turns spot checks off: a random draw never matches the stored one.
        spot_check: rows recomputed and compared with the store each epoch, the safety net
            for what no fingerprint sees (a file edited in place, a global config object).
            Cached rows are loaded raw, run through the module as a miss would be (one
            batch, same collate, dtype and autocast), and every stored column is compared
            (floats within a tolerance set by dtype and autocast); a mismatch raises
            :class:`~cachedfeatures.errors.StaleFeaturesError`. Nothing is written. "Each
            epoch" is: once per iteration of :meth:`loader` (at its first batch with hits),
            once per :meth:`prefill` (random rows cached before it ran), and on the map-style
            path (``cached[i]``, a plain DataLoader) at the first batch with hits in each
            process (each DataLoader worker), then again after every ``len(dataset)`` rows
            that process served. The loader and the map-style path draw the rows at random
            from that batch's hits, whose stored values are already read. Skipped where the
            module cannot run (``device="cuda"`` inside a DataLoader worker) and where the
            rows cannot be recomputed (raw samples gone: logged once). Default 8; ``0`` turns
            the checks off.
        max_bytes: a size budget for the whole store on disk (all entries, all processes),
            as bytes or a string like ``"10GB"`` / ``"512MiB"``; checked after every chunk
            written, dropping whole chunks (see ``policy``). Default ``None``: no budget.
        policy: which chunks of this entry go first when over budget, after those of other
            entries (least recently used entry first): ``"mru"`` (default) the most recently
            used, which keeps a stable subset cached across repeated passes; ``"lru"`` the
            least recently used, for access that is not cyclic.
        autocast_dtype: run the module under ``torch.autocast`` with this dtype (for example
            ``torch.bfloat16``). It changes the stored values, so it is part of the entry key.
            Default ``None``: no autocast.

        chunk_cache_bytes: the most bytes of decoded chunks each process keeps in memory
            (``0``: none). Default ``None``: an eighth of physical memory, split between
            DataLoader workers. An entry that fits is held whole, one array per column; else
            raw chunks of a local store are held open and read row by row rather than held.
        read_route: ``"auto"`` reads plain local chunk files directly; ``"zarr"`` reads
            every chunk through zarr. See :mod:`cachedfeatures.reader.chunk_reader`.
        checksum: end every chunk with a crc32c of its bytes, checked on every read, so a torn,
            overwritten or bit-flipped chunk is recomputed instead of served (uncompressed
            chunks have no other guard), and a per-chunk checksum bound to the chunk's identity,
            so a chunk file put in another chunk's place is recomputed too. Default ``True``;
            ``False`` reads raw chunks of an entry larger than the chunk cache without reading
            each version of a chunk once to verify it. Used when the entry is created.
        storage_options: fsspec options for a URL store (``store="s3://bucket/f.zarr"``),
            such as ``{"endpoint_url": ...}`` or credentials.
        read_only: never write to the store: hits are served, misses are computed and served
            but not stored (one :class:`~cachedfeatures.errors.ReadOnlyStoreWarning`).
        owned_chunks: a :class:`~cachedfeatures.store.ownership.ChunkOwnership`: store only the rows
            of the chunks this process owns (several writers on an object store, which has no
            locks). Default ``None``: this process may write every chunk, except on a store
            without file locks in a process that is one rank of several (an initialised process
            group, or torchrun's ``RANK``/``WORLD_SIZE``): then it owns its rank's chunks
            (``ChunkOwnership.from_env()``). ``ChunkOwnership(0, 1)``: every chunk, always.
        write_guard: the :class:`~cachedfeatures.store.faults.WriteGuard` that runs store writes and
            pauses caching when the store fails (disk full, I/O error); default a new one.
        call: how the module is called on a collated batch: ``"positional"`` (``module(batch)``),
            ``"kwargs"`` (``module(**batch)``, for a Mapping batch such as a tokenizer's
            ``BatchEncoding``) or ``"auto"`` (default): keywords when the batch is a Mapping whose
            keys all name parameters of the module's ``forward``, else one argument. Applies to
            every path (``cached[i]``, :meth:`loader`, :meth:`prefill`, spot checks). See
            :mod:`cachedfeatures.compute.calls`.
        output: what to cache from what the module returns (a ``ModelOutput``, a dict or a tuple
            that also holds non-tensors): a key (``"sentence_embedding"``,
            ``"last_hidden_state"``), an attribute name, an index, or a callable ``output ->
            tensors``, or ``(output, batch) -> tensors`` given the batch the module got (mean
            pooling needs its ``attention_mask``); it runs under inference mode right after
            the module. Part of the entry key (a callable with its code and what it reads).
            Default ``None``: all of it.
        field_names: names of the arrays the passthrough fields are stored in (and shown by
            xarray and the CLI): ``{1: "label"}`` (a tuple position, a dict key, or a tuple path
            into nested samples) or one name per item of a tuple sample, ``("image", "label")``
            (the input's name is not used; ``None`` keeps a default). Default: a dict key names
            its field, tuple position ``i`` gives ``field_i``. Names that change what is stored
            are part of the entry key, so renaming a field creates a new entry.
        ragged: declares arrays whose rows vary in length along their first dimension, stored
            unpadded (see docs/concepts/variable-length.md), by name: a module output
            (``"features"``, ``"features_<key>"`` or its output key) or a field. ``True``: ragged
            (for an output given as a list of per-sample tensors or a ``torch.nested`` tensor,
            or a field whose probes happened to share one length); a string: the output is
            returned padded ``(B, T, ...)`` and this names its mask ``(B, T)`` or lengths
            ``(B,)``, in the module's output (a dict item then not stored) or in the collated
            input batch (``"attention_mask"``): only the real positions are stored. Outputs
            returned as lists or nested tensors, lists of numbers, and tensor or array fields
            whose probes differ in length are ragged without it. Part of the entry key.
        views: cache ``views`` random draws of every sample (random augmentation kept, not
            frozen) and serve one of them per epoch: view ``v`` of sample ``i`` is loaded with
            torch's (CPU), NumPy's and Python's global generators seeded from ``(view_seed, i, v)``
            (then restored), so it is the same draw in every process, worker and run. A fill costs
            ``views`` passes of the module and the entry holds each view's rows one after another
            (row ``v * stride + i``, ``stride`` being ``len(dataset)`` rounded up to whole chunks;
            passthrough fields are stored per view, since an augmentation may move boxes or masks
            too). Call :meth:`set_epoch` at the start of each
            epoch with a plain DataLoader; :meth:`loader` does it itself. A dataset whose draws
            follow none of the seeded generators raises
            :class:`~cachedfeatures.errors.NonDeterministicDatasetError`. Methods that take
            *rows* (:meth:`compute`, :meth:`load`, :meth:`write`, ``spot_check(among=)``) take
            entry rows; :meth:`rows_of` maps sample indices to them. See
            docs/guides/augmentation.md. Default ``None``: no views (a random dataset raises).
        view_seed: the base seed of the views (part of the entry key). Default 0.
        view_schedule: which view an epoch serves: ``"permutation"`` (default: in each cycle of
            ``views`` epochs, ``c * views`` to ``c * views + views - 1``, each sample is served each
            of its views once) or
            ``"random"`` (a uniformly random view per sample and epoch).
        view_generators: generators the dataset draws from besides the global ones
            (``torch.Generator``, ``numpy.random.Generator``, ``random.Random``), seeded like
            them for every view.

    With ``device="cuda"``, compute misses through :meth:`loader` (workers do I/O, the module
    runs in this process) or fill the cache first with :meth:`prefill`; a plain DataLoader
    worker cannot use CUDA.

    The keyword options are validated once, before anything is loaded or opened, into
    :attr:`settings`, a frozen :class:`~cachedfeatures.options.DatasetOptions`; ``batch_size``,
    ``device``, ``dtype``, ``max_bytes``, ``policy`` and the like read from it.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        module: Callable[..., Any],
        store: StoreLike = None,
        *,
        input_key: InputKey = 0,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        compressor: Compressor = "default",
        chunk_rows: int | None = None,
        collate_fn: Collate | None = None,
        module_version: str | None = None,
        dataset_version: str | None = None,
        allow_nondeterministic: bool = False,
        spot_check: int = DEFAULT_SPOT_CHECK,
        max_bytes: int | float | str | None = None,
        policy: Policy = "mru",
        autocast_dtype: torch.dtype | None = None,
        chunk_cache_bytes: int | None = None,
        read_route: ReadRoute = "auto",
        checksum: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        read_only: bool = False,
        owned_chunks: ChunkOwnership | None = None,
        write_guard: WriteGuard | None = None,
        call: Call = "auto",
        output: OutputSelection | None = None,
        field_names: FieldNames | None = None,
        ragged: Mapping[str, str | bool] | Sequence[str] | None = None,
        views: int | None = None,
        view_seed: int = 0,
        view_schedule: Schedule = "permutation",
        view_generators: Sequence[Generator] | None = None,
    ) -> None:
        self.dataset = dataset
        self.module = module
        self.settings = settings = DatasetOptions(
            input_key=input_key,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            compressor=compressor,
            chunk_rows=chunk_rows,
            collate_fn=collate_fn,
            module_version=module_version,
            dataset_version=dataset_version,
            allow_nondeterministic=allow_nondeterministic,
            spot_check=spot_check,
            max_bytes=max_bytes,
            policy=policy,
            autocast_dtype=autocast_dtype,
            chunk_cache_bytes=chunk_cache_bytes,
            read_route=read_route,
            checksum=checksum,
            storage_options=storage_options,
            read_only=read_only,
            owned_chunks=owned_chunks,
            call=call,
            output=output,
            field_names=field_names,
            ragged=ragged,
            views=views,
            view_seed=view_seed,
            view_schedule=view_schedule,
            view_generators=view_generators,
        )
        mode_dependent = mode_dependent_submodules(module)
        if mode_dependent:
            raise TrainingModeError(
                training_mode_message(
                    cast(torch.nn.Module, module), mode_dependent, "Call module.eval() before wrapping it."
                )
            )
        self._length = len(dataset)  # type: ignore[arg-type]
        # What the entry's rows are: the samples, or each view of each sample (row v * stride + i).
        self._source: Dataset[Any] = dataset
        self._views: ViewedSamples | None = None
        if settings.views is not None:
            self._views = ViewedSamples(dataset, settings.views, settings.view_seed, settings.view_generators)
            self._source = self._views
        self._schedule: ViewSchedule | None = None
        # [the epoch whose views are served (-1 until one is set), rows served without an epoch
        # set, whether that was warned about]; with views in shared memory, so that DataLoader
        # workers (persistent ones too) see set_epoch() and count towards the warning.
        self._epoch = torch.tensor([-1, 0, 0], dtype=torch.int64)
        if settings.views is not None:
            self._epoch.share_memory_()  # type: ignore[no-untyped-call]
        self._epoch_set = False  # set_epoch() called since the last loader epoch began (this process)
        self._spot = SpotCheckState(settings.spot_check, self._length)
        self._computer = FeatureComputer(
            module,
            settings.device,
            settings.dtype,
            settings.collate_fn,
            settings.autocast_dtype,
            settings.call,
            settings.output,
        )
        self._opened: OpenedStore = open_store(store, settings, write_guard)
        self.write_guard = self._opened.guard
        self.module_fingerprint = module_fingerprint(module, settings.module_version)
        self._module_state_tracked = settings.module_version is None and isinstance(module, torch.nn.Module)

        probe = self._probe_dataset()
        self.dataset_fingerprint = probe.fingerprint
        self.probe_loads = probe.loads
        self.options: dict[str, Any] = settings.key_options()
        if settings.field_names is not None and self._length > 0:  # only names that change the arrays
            sample = next(iter(probe.samples.values())) if probe.samples else dataset[0]
            named = renamed_fields(sample, settings.input_key, settings.field_names)
            if named:
                self.options["field_names"] = named
        key = entry_id(self.module_fingerprint, self.dataset_fingerprint, self.options)
        self.entry_name = f"{_entry_prefix(module)}-{key}"
        # An empty dataset has no entry, so no binding: nothing can be read or written.
        self._binding: EntryBinding | None = None
        self._default_assembler: BatchAssembler | None = None
        self._fetcher_assembler: tuple[object, BatchAssembler | None] | None = None
        if self._length > 0:
            self._rename_if_names_collide(self._opened.store)
            self._binding = EntryBinding(
                self._opened,
                store,
                settings,
                self.entry_name,
                functools.partial(self._new_entry, probe.samples),
            )

    # -- construction helpers -------------------------------------------------------------------

    def _probe_dataset(self) -> DatasetProbe:
        """The dataset's fingerprint; with views, probe ``i`` is loaded as view ``i % views``
        (under its seed, so a reload must match), and the ``view_generators`` are hashed as
        seeded (each load reseeds them, so their state now changes nothing)."""
        settings, views = self.settings, self._views
        load = self.dataset.__getitem__ if views is None else (lambda i: views.view(i, i % views.views))
        try:
            probe = dataset_fingerprint(
                self.dataset,
                load,
                self._extract_input_unchecked,
                version=settings.dataset_version,
                allow_nondeterministic=settings.allow_nondeterministic,
                seeded=settings.view_generators,
            )
        except NonDeterministicDatasetError as error:
            if views is None:
                raise
            raise NonDeterministicDatasetError(
                f"views={views.views} loads each view under its own seed of torch's, NumPy's and Python's "
                f"global generators, but sample {error.sample} of {qualified_name(self.dataset)} loaded "
                f"twice as view {(error.sample or 0) % views.views}, under that view's seed, gave two "
                "different inputs: the dataset draws from a generator of its own (a torch.Generator, "
                "numpy.random.default_rng(), random.Random) or reads changing data. Pass that "
                "generator as view_generators=[generator], or draw from the global generators."
            ) from None
        return probe

    def _rename_if_names_collide(self, store: FeatureStore) -> None:
        """Move to a new entry where the existing one was written before output names were unique."""
        found = store.entry(self.entry_name)
        if found is not None and not OutputLayout.from_json(found.meta["outputs"]).names_unique:
            # Written before output names were made unique: two outputs share one array, so
            # one is served the other's values. A new entry (the old one is pruned first).
            self.options["output_names"] = "unique"
            key = entry_id(self.module_fingerprint, self.dataset_fingerprint, self.options)
            self.entry_name = f"{type(self.module).__name__}-{key}"
            logger.warning(
                "cachedfeatures: entry %s stores two module outputs in one array (their keys "
                "sanitise to one name); caching into a new entry %s instead.",
                found.name,
                self.entry_name,
            )

    def _extract_input_unchecked(self, sample: Any) -> Any:
        # Without learning the fields: one that cannot be stored is reported (with the probe's
        # index and the likely fix) when the entry is created.
        return SampleLayout({"kind": "input"}, (), (), self.input_key).extract_input(sample)

    def _new_entry(self, probes: dict[int, Any]) -> NewEntry:
        """What creating the entry takes: the layouts and the features of one probe sample."""
        index = next(iter(probes), 0)  # a sample index (with views: its probe is view index % K)
        views = self._views
        if probes:
            sample = probes[index]
        else:
            sample = self.dataset[index] if views is None else views.view(index, index % views.views)
        others = [probe for row, probe in probes.items() if row != index]
        module = self.module
        tracked = self._module_state_tracked and isinstance(module, torch.nn.Module)
        before = module_state_digests(module) if tracked and isinstance(module, torch.nn.Module) else {}
        try:
            sample_layout = SampleLayout.from_sample(
                sample, self.input_key, self.settings.field_names, others=others, ragged=self.ragged
            )
            fields = sample_layout.field_values([sample], [index])
            raw = self._computer.run([sample_layout.extract_input(sample)])
        except Exception as error:  # name the sample, the field, its type and the fix
            explained = explain_probe_failure(
                error,
                index=index,
                sample=sample,
                input_key=self.input_key,
                dataset=self.dataset,
                default_collate=self._computer.collate_fn is default_collate,
            )
            if explained is None:
                raise
            raise explained from error
        batch, self._computer.last_batch = self._computer.last_batch, None
        per_sample = None
        if isinstance(raw, list) and len(raw) == 1 and others:
            # One output, or one tensor per sample? A list whose length follows the batch's is
            # the latter (a sample whose length is 1 looks like a batch of one otherwise).
            pair = self._computer.run([sample_layout.extract_input(s) for s in (sample, others[0])])
            per_sample = isinstance(pair, list) and len(pair) == 2
        if before:
            _warn_if_state_changed(self.module, before)
        output_layout = OutputLayout.from_output(
            raw, 1, self.dtype, detect_ragged=True, per_sample=per_sample, ragged=self.ragged, batch=batch
        )
        outputs = output_layout.split(raw, 1, self.dtype, batch=batch)
        self._computer.last_batch = None
        _check_ragged_names(self.ragged, output_layout, sample_layout)
        specs: list[ArraySpec] = [*output_layout.arrays, *sample_layout.fields]
        chunk_rows = self.settings.chunk_rows
        num_rows, row = self._length, index
        if chunk_rows is None:
            chunk_rows = default_chunk_rows(
                sum(spec.row_nbytes for spec in specs), self._length * (1 if views is None else views.views)
            )
        if views is not None:  # each view starts on a chunk boundary
            views.stride = ViewedSamples.stride_for(self._length, chunk_rows)
            num_rows, row = views.views * views.stride, views.row(index, index % views.views)
        meta = {
            "module": self.module_fingerprint.to_json(),
            "dataset": self.dataset_fingerprint.to_json(),
            "options": self.options,
            "sample": sample_layout.to_json(),
            "outputs": output_layout.to_json(),
            "library_version": __version__,
        }
        if self._views is not None:  # how the rows map to samples, for explore and the CLI
            meta["views"] = {
                "count": self._views.views,
                "samples": self._length,
                "stride": self._views.stride,
                "seed": self._views.seed,
            }
        columns = {spec.name: spec.tensor_batch_to_numpy(outputs[spec.name]) for spec in output_layout.arrays}
        return NewEntry(meta, specs, num_rows, chunk_rows, row, {**columns, **fields})

    def _bound(self) -> EntryBinding:
        """The binding to the entry; an empty dataset has none, so there is nothing to read or write."""
        if self._binding is None:
            raise CacheError(
                f"the dataset is empty, so it has no entry in {self.store.location}: there is nothing "
                "to read, compute or write. Wrap a dataset that has samples."
            )
        return self._binding

    # -- the options, as attributes ------------------------------------------------------------

    @property
    def input_key(self) -> InputKey:
        return self.settings.input_key

    @property
    def ragged(self) -> dict[str, str | bool]:
        """The ``ragged=`` declarations, parsed: ``{array name: True | mask key}``."""
        return dict(self.settings.ragged)

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def device(self) -> torch.device:
        return self.settings.device

    @property
    def dtype(self) -> torch.dtype | None:
        return self.settings.dtype

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.settings.autocast_dtype

    @property
    def max_bytes(self) -> int | None:
        return self.settings.max_bytes

    @property
    def policy(self) -> Policy:
        return self.settings.policy

    @property
    def spot_check_rows(self) -> int:
        return self.settings.spot_check

    @property
    def owned_chunks(self) -> ChunkOwnership | None:
        """The chunks this process stores (``None``: every chunk it may, see ``owned_chunks=``)."""
        return self.settings.owned_chunks if self._binding is None else self._binding.owned_chunks

    @owned_chunks.setter
    def owned_chunks(self, value: ChunkOwnership | None) -> None:
        if self._binding is not None:  # an empty dataset stores nothing anyway
            self._binding.owned_chunks = value

    def ragged_positions(self) -> list[tuple[Any, ...]]:
        """Where a served sample holds rows that vary in length (key/index paths; ``()`` for a
        bare features tensor): ragged module outputs and ragged passthrough fields."""
        if self._binding is None:
            return []
        return ragged_positions(self._binding.sample_layout, self._binding.output_layout)

    @property
    def pad_collate(self) -> PadCollate:
        """A collate function for this dataset's samples: ragged outputs and fields become
        :class:`~cachedfeatures.pipeline.collate.RaggedBatch` (padded values and lengths) in every
        batch; the rest is collated as ``default_collate`` does. Pass it to a DataLoader."""
        return PadCollate(self.ragged_positions())

    # -- views ----------------------------------------------------------------------------------

    @property
    def views(self) -> int | None:
        """How many augmentation draws are cached per sample (``None``: no views)."""
        return self.settings.views

    @property
    def epoch(self) -> int:
        """The epoch whose views the map-style path serves (0 until :meth:`set_epoch`)."""
        return max(0, int(self._epoch[0]))

    def set_epoch(self, epoch: int) -> None:
        """Serve the views of ``epoch`` from now on, here and in DataLoader workers.

        Call it at the start of every epoch, as with ``DistributedSampler``: the epoch is held
        in shared memory, so workers (persistent ones too) serve the new epoch's views from the
        next batch they fetch. :meth:`loader` counts epochs itself (from the epoch set here, if
        one was). Without views it does nothing.
        """
        self._epoch[0] = parse_int("epoch", epoch, minimum=0, maximum=_MAX_EPOCH)
        self._epoch_set = True

    def begin_epoch(self, epoch: int | None = None) -> int:
        """Start a :meth:`loader` epoch and return its number: ``epoch`` when given (a resumed
        loader), else the epoch given to :meth:`set_epoch` since the last one began, else the one
        after the last (0 at first), whichever loader served it."""
        if epoch is None:
            current = int(self._epoch[0])
            epoch = max(0, current) if self._epoch_set or current < 0 else current + 1
        self._epoch[0] = epoch
        self._epoch_set = False
        return epoch

    def rows_of(self, indices: Sequence[int] | np.ndarray, epoch: int) -> np.ndarray:
        """The entry rows that serve sample ``indices`` in ``epoch``: with views, the row of
        the view the schedule picks (see ``view_schedule=``); without, the indices themselves."""
        rows = np.asarray(indices)
        if rows.dtype.kind not in "iu" or (len(rows) and not (rows.min() >= 0 and rows.max() < self._length)):
            raise InvalidArgumentError(
                f"Expected indices to be sample indices from 0 to {self._length - 1}. Got {indices!r}."
            )
        rows = rows.astype(np.int64)
        if self._views is None:
            return rows
        return self._view_schedule().rows(rows, parse_int("epoch", epoch, minimum=0, maximum=_MAX_EPOCH))

    def views_of(self, indices: Sequence[int] | np.ndarray, epoch: int) -> np.ndarray:
        """The view each of sample ``indices`` serves in ``epoch`` (zeros without views)."""
        rows = self.rows_of(indices, epoch)
        if self._views is None:
            return np.zeros_like(rows)
        views: np.ndarray = rows // self._view_schedule().stride
        return views

    def _viewed(self) -> ViewedSamples:
        """The views, with their stride known (from the entry, once it is bound)."""
        views = self._views
        if views is None:
            raise InvalidArgumentError(
                "this dataset caches no views: pass views=K to cache K draws per sample."
            )
        if views.stride is None:
            entry = self._bound().entry  # creating it sets the stride
            if views.stride is None:
                views.stride = int(entry.meta["views"]["stride"])
        return views

    def _view_schedule(self) -> ViewSchedule:
        if self._schedule is None:
            views, settings = self._viewed(), self.settings
            assert views.stride is not None  # set by _viewed()
            self._schedule = ViewSchedule(
                views.views,
                self._length,
                views.stride,
                settings.view_seed,
                settings.view_schedule,
                self._bound().entry.chunk_rows,
            )
        return self._schedule

    def view_rows(self, views: int | Sequence[int] | None = None) -> np.ndarray:
        """The entry rows of ``views`` (a view number or several; default all) of every sample."""
        viewed = self._viewed()
        if views is None:
            chosen: list[int] = list(range(viewed.views))
        else:
            listed = [views] if isinstance(views, (int, np.integer)) else views
            if not isinstance(listed, (list, tuple, range, np.ndarray)):
                raise InvalidArgumentError(expected("views to be a view number or a list of them", views))
            chosen = sorted({parse_int("views", v, minimum=0, maximum=viewed.views - 1) for v in listed})
        samples = np.arange(self._length, dtype=np.int64)
        return np.concatenate([samples + viewed.row(0, v) for v in chosen] or [np.empty(0, np.int64)])

    def load_view(self, index: int, view: int) -> Any:
        """Sample ``index`` of the dataset as drawn for view ``view`` (its raw sample, loaded now
        under that view's seed): what the cached features of that view were computed from."""
        if self._views is None:
            raise InvalidArgumentError(
                "this dataset caches no views: pass views=K to cache K draws per sample."
            )
        view = parse_int("view", view, minimum=0, maximum=self._views.views - 1)
        return self._views.view(int(self._normalize([index])[0]), view)

    def _epoch_to_serve(self, served: int) -> int:
        """The epoch set by :meth:`set_epoch`; warns once when a whole epoch was served without it
        (counted across DataLoader workers: the count is in shared memory)."""
        epoch = int(self._epoch[0])
        if epoch >= 0:
            return epoch
        self._epoch[1] += served
        if int(self._epoch[1]) > self._length and int(self._epoch[2]) == 0 and (self.views or 1) > 1:
            self._epoch[2] = 1
            logger.warning(
                "cachedfeatures: more than one epoch served without set_epoch(), so every epoch serves "
                "the same view of each sample. Call cached.set_epoch(epoch) at the start of each epoch "
                "(or iterate over cached.loader(), which counts epochs)."
            )
        return 0

    # -- the map-style API -----------------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int | Sequence[int] | np.ndarray | torch.Tensor) -> Any:
        """The sample at ``index``; or, given several indices (a list, a 1-d array or tensor), their
        collated batch, as ``pad_collate`` (ragged entries) or ``default_collate`` makes it of their
        samples, built straight from the stored columns. The latter is what a
        ``DataLoader(cached, batch_size=None, sampler=cached.batch_sampler(...))`` asks for."""
        if isinstance(index, (np.ndarray, torch.Tensor)) and index.ndim > 0:
            index = index.tolist()
        if isinstance(index, Sequence) and not isinstance(index, (str, bytes)):
            return self.batch_assembler()(self._columns(self._normalize(index)))
        return self.__getitems__([index])[0]  # type: ignore[list-item]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The samples at ``indices``: hits read from the store, misses computed in batches.

        Called by a DataLoader's fetcher (directly or through ``Subset``s) whose ``collate_fn`` is
        ``default_collate`` or a ``pad_collate``, the first sample also carries the batch made
        from the stored columns, which that collate returns instead of stacking the samples again
        (:func:`~cachedfeatures.pipeline.collate.carry_batch`): the same batch, exactly.
        """
        rows = self._normalize(indices)
        if len(rows) == 0:
            return []
        columns = self._columns(rows)
        samples = self.assemble_all(columns)
        collate_fn = _collate_fn_of_fetcher(sys._getframe(1))
        if collate_fn is not None:
            # For a DataLoader's fetcher, which hands them to its collate_fn: the samples carry
            # their batch, made from the columns, which that collate_fn then returns as it is.
            assembler = self._assembler_for(collate_fn)
            if assembler is not None:
                return carry_batch(samples, functools.partial(assembler, columns), collate_fn)
        return samples

    def _assembler_for(self, collate_fn: object) -> BatchAssembler | None:
        """The assembler that stands for ``collate_fn`` (``default_collate`` or a ``PadCollate``) on
        this entry, or ``None``; the last one made is kept (a DataLoader asks for every batch)."""
        kept = self._fetcher_assembler
        if kept is not None and kept[0] is collate_fn:
            return kept[1]
        binding = self._bound()
        assembler = BatchAssembler.of(collate_fn, binding.sample_layout, binding.output_layout)
        self._fetcher_assembler = (collate_fn, assembler)
        return assembler

    def _columns(self, rows: np.ndarray) -> Mapping[str, np.ndarray]:
        """The stored columns of ``rows`` (fresh arrays, a row per row): hits read, misses computed
        and stored, a spot check where one is due."""
        binding = self._bound()
        if len(rows) == 0:
            return {spec.name: spec.empty_column(0) for spec in binding.entry.specs}
        self._warn_if_private_store_in_worker()
        if self._views is not None:
            rows = self.rows_of(rows, self._epoch_to_serve(len(rows)))
        read = binding.read(rows)
        if self.spot_check_rows and self._spot.due_on_serve(len(rows), read.hits):
            self.spot_check_hits(rows if read.all_hit else rows[read.hit], read.arrays)
        if read.all_hit:
            return read.arrays
        columns = {
            name: spec.empty_column(len(rows)) for name, spec in ((s.name, s) for s in binding.entry.specs)
        }
        for name, column in read.arrays.items():
            columns[name][read.hit] = column
        missing = ~read.hit
        binding.write_aged()  # rows held past their time are stored, whether or not this batch misses
        if missing.any():
            held, held_columns = binding.held(rows[missing])
            if held.any():  # computed earlier in this process, not yet written: served as held
                at = np.flatnonzero(missing)[held]
                for name, column in held_columns.items():
                    columns[name][at] = column
                missing[at] = False
        if missing.any():
            self._check_can_compute_here()
            miss_rows, where = np.unique(rows[missing], return_inverse=True)
            computed = self._compute_held(miss_rows, hold=_batch_of_a_dataloader())
            for name, column in computed.items():
                columns[name][missing] = column[where]
        return columns

    def _compute_held(self, rows: np.ndarray, *, hold: bool) -> dict[str, np.ndarray]:
        """Load and compute ``rows`` in batches; stored through the write-back buffer if ``hold``,
        else at once."""
        binding = self._bound()
        store = binding.write_back if hold else binding.write
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            columns = self.compute_loaded(self.load(batch))
            store(batch, columns)
            parts.append(columns)
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def compute(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Load, compute and store ``rows`` (whether cached or not), in batches.

        Returns the stored columns, one row per requested row, exactly as a later hit reads them.
        """
        binding = self._bound()
        rows = np.asarray(rows, dtype=np.int64)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            columns = self.compute_loaded(self.load(batch))
            binding.write(batch, columns)
            parts.append(columns)
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def spot_check(self, rows: int | None = None, *, among: Sequence[int] | np.ndarray | None = None) -> int:
        """Recompute up to ``rows`` random cached rows now and compare them with the store.

        Reads their stored values, loads their raw samples, runs them through the module in
        one batch as a miss would, and compares every stored column; writes nothing. ``rows``
        defaults to ``spot_check=``; ``among`` limits the choice to these rows (those not
        valid are left out). Returns how many rows were compared: 0 where there is nothing to
        check or the check cannot run here (see ``spot_check=``).

        Raises:
            StaleFeaturesError: some rows differ from what is stored.
        """
        state = self._spot.here()
        count = state.rows if rows is None else parse_spot_check(rows)
        if self._binding is None or not self._can_spot_check(count):
            return 0
        hits = self._binding.hits
        valid = hits.entry.valid_mask()
        candidates = np.flatnonzero(valid)
        if among is not None:
            among = np.unique(np.asarray(among, dtype=np.int64))
            candidates = among[valid[among]]
        picked = state.choose(candidates, count)
        if len(picked) == 0:
            return 0
        read = hits.read(picked)  # no access recorded
        return self._compare_with_recomputed(hits.entry, picked[read.hit], read.arrays)

    def spot_check_hits(self, rows: np.ndarray, stored: Mapping[str, np.ndarray]) -> int:
        """A spot check of up to ``spot_check`` random rows among ``rows``, just read as hits.

        ``stored`` holds their columns, one row per row of ``rows``: the stored values are
        already at hand, so the check reads nothing more from the store (and leaves the chunk
        cache and the access statistics as they are).
        """
        state = self._spot.here()
        if self._binding is None or not self._can_spot_check(state.rows) or len(rows) == 0:
            return 0
        distinct, first = np.unique(rows, return_index=True)
        if len(distinct) > state.rows:
            keep = np.sort(state.generator.choice(len(distinct), size=state.rows, replace=False))
            distinct, first = distinct[keep], first[keep]
        columns = {name: column[first] for name, column in stored.items()}
        return self._compare_with_recomputed(self._binding.entry, distinct, columns)

    def _can_spot_check(self, count: int) -> bool:
        if count == 0 or self.settings.allow_nondeterministic:
            return False
        # The module cannot run in a DataLoader worker on CUDA; loader() and prefill() check
        # in the main process.
        return not (self.device.type == "cuda" and get_worker_info() is not None)

    def _compare_with_recomputed(
        self, entry: Entry, rows: np.ndarray, stored: Mapping[str, np.ndarray]
    ) -> int:
        """Recompute ``rows`` as a miss would and compare with their ``stored`` columns.

        A check that cannot run (the raw samples fail to load: deleted once cached; the
        module fails on them) is skipped with a warning logged once per process: it is a
        safety net, and the hits it would check are served as they are.
        """
        if len(rows) == 0:
            return 0
        state = self._spot.here()
        calls = self._computer.calls
        try:
            recomputed = self.compute_loaded(self.load(rows))
        except Exception as error:
            if not state.warned:
                state.warned = True
                logger.warning(
                    "cachedfeatures: spot check of entry %s skipped: recomputing rows %s failed "
                    "(%s: %s), so cached features are served unchecked. Pass spot_check=0 to "
                    "turn the checks off.",
                    entry.name,
                    rows.tolist(),
                    type(error).__name__,
                    error,
                )
            return 0
        finally:
            state.module_calls += self._computer.calls - calls
        state.checks += 1
        state.checked_rows.extend(rows.tolist())
        precision = precision_of(self.module, self.device, self.autocast_dtype)
        mismatches = compare_columns(entry.specs, rows, stored, recomputed, entry.feature_names, precision)
        if mismatches:
            raise stale_error(entry.name, self.store.backend, len(rows), mismatches)
        return len(rows)

    def load(self, rows: Sequence[int] | np.ndarray) -> LoadedRows:
        """The raw samples of ``rows`` (module inputs and fields to store); no module call."""
        return self.row_loader()(rows)

    def row_loader(self) -> RowLoader:
        """A picklable, module-free loader of raw samples (of entry rows), for worker processes."""
        return RowLoader(self._source if self._views is None else self._viewed(), self._bound().sample_layout)

    def compute_loaded(self, loaded: LoadedRows, *, pin_memory: bool = False) -> dict[str, np.ndarray]:
        """Run the module on loaded rows (in batches of ``batch_size``); the columns to store."""
        output_layout = self._bound().output_layout
        self._check_can_compute_here()
        return compute_loaded(self._computer, output_layout, loaded, self.batch_size, pin_memory=pin_memory)

    def _check_can_compute_here(self) -> None:
        if self.device.type == "cuda" and get_worker_info() is not None:
            raise DeviceInWorkerError(
                f"a DataLoader worker needs to compute features on {self.device}, but CUDA cannot "
                "run in DataLoader worker processes (and each worker would hold its own copy of "
                "the module). Iterate over cached.loader(batch_size=..., num_workers=...) instead, "
                "which runs the module in this process and only I/O in workers, or call "
                "cached.prefill() before training so that workers only read hits."
            )

    def write(self, rows: Sequence[int] | np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
        """Store computed ``columns`` for ``rows``: under the size budget, recording access.

        The pipeline's background writer stores through this, like :meth:`compute` does.
        """
        self._bound().write(np.asarray(rows, dtype=np.int64), columns)

    def record_hits(self, rows: np.ndarray) -> None:
        """Count reads of ``rows`` that the pipeline's workers served from the store."""
        if self._binding is not None:
            self._binding.record_hits(rows)

    def hit_reader(self) -> CheckedReader:
        """The entry's reads, less hits whose feature bytes are gone: how the pipeline's
        workers read hits. A :class:`~cachedfeatures.errors.CacheError` for an empty dataset."""
        return self._bound().hits

    def assemble_all(self, columns: Mapping[str, np.ndarray]) -> list[Any]:
        """One sample per row of ``columns``; each output array becomes one tensor first."""
        binding = self._bound()
        layout, outputs = binding.sample_layout, binding.output_layout
        tensors = {
            spec.name: (spec.numpy_to_tensors if spec.ragged else spec.numpy_to_tensor)(columns[spec.name])
            for spec in outputs.arrays
        }
        return layout.build_many(outputs.unbind(tensors), columns)

    def batch_assembler(self, collate_fn: Collate | None = None) -> Callable[[Mapping[str, np.ndarray]], Any]:
        """What turns the stored columns of a batch into ``collate_fn(samples)`` of its samples.

        For ``default_collate`` (of an entry without ragged arrays) and :attr:`pad_collate` it is a
        :class:`~cachedfeatures.pipeline.collate.BatchAssembler`, which builds the batch straight
        from the columns; any other ``collate_fn`` gets the samples (:meth:`assemble_all`).
        ``None``: :attr:`pad_collate` for an entry with ragged arrays, else ``default_collate``.
        """
        binding = self._bound()
        if collate_fn is None and self._default_assembler is not None:
            return self._default_assembler  # kept: every cached[rows] asks (and it pickles to workers)
        chosen = collate_fn
        if chosen is None:
            chosen = self.pad_collate if self.ragged_positions() else default_collate
        fast = BatchAssembler.of(chosen, binding.sample_layout, binding.output_layout)
        if fast is None:
            return lambda columns: chosen(self.assemble_all(columns))
        if collate_fn is None:
            self._default_assembler = fast
        return fast

    def batch_sampler(
        self,
        batch_size: int | None = None,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        sampler: Sampler[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> BatchSampler:
        """Batches of row indices for ``DataLoader(cached, batch_size=None, sampler=...)``.

        The DataLoader then asks :meth:`__getitem__` for whole batches, which it builds straight from
        the stored columns (hits read, misses computed and stored, spot checks, as
        :meth:`__getitems__` does) instead of a sample per row that ``collate_fn`` stacks again.

        Args:
            batch_size: rows per batch. Default this dataset's ``batch_size``.
            shuffle: a new random order every epoch (drawn from ``generator``). Default ``False``.
            drop_last: drop the last, smaller batch. Default ``False``.
            sampler: any ``Sampler`` of row indices instead of ``shuffle`` (a
                :class:`~cachedfeatures.ChunkShuffleSampler`, a ``DistributedSampler``); its
                ``set_epoch`` is reached through the batch sampler's.
            generator: the random generator of ``shuffle``. Default torch's global one.
        """
        size = parse_positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        if sampler is not None and shuffle:
            raise InvalidArgumentError(
                "Expected shuffle=False with a sampler (it sets the order). Got shuffle=True."
            )
        if sampler is None:
            sampler = RandomSampler(self, generator=generator) if shuffle else SequentialSampler(self)
        return EpochBatchSampler(sampler, size, drop_last)

    def _normalize(self, indices: Sequence[int]) -> np.ndarray:
        if type(indices) is list:  # the common case: NumPy infers int64 only from integers
            try:
                fast = np.asarray(indices)
            except (TypeError, ValueError):  # ragged or odd items: the checks below say what
                fast = np.empty(0, dtype=object)
            if fast.dtype == np.int64 and fast.ndim == 1:
                if len(fast) == 0 or int(fast.view(np.uint64).max()) < self._length:
                    return fast  # all in range and none negative (negatives view as huge)
                low, high = int(fast.min()), int(fast.max())
                if -self._length <= low and high < self._length:
                    return fast % self._length
        rows = np.empty(len(indices), dtype=np.int64)
        for position, index in enumerate(indices):
            try:
                value = operator.index(index)
            except TypeError:
                raise TypeError(
                    f"dataset indices must be integers; got {type(index).__name__}. "
                    "Index with an int, or use __getitems__ for several."
                ) from None
            if not -self._length <= value < self._length:
                raise IndexError(f"index {value} is out of range for a dataset of {self._length} samples.")
            rows[position] = value % self._length
        return rows

    def _warn_if_private_store_in_worker(self) -> None:
        private = get_worker_info() is not None and self.store.backend.is_memory
        if private and not getattr(self, "_warned_memory_worker", False):
            self._warned_memory_worker = True
            logger.warning(
                "cachedfeatures: an in-memory store inside a DataLoader worker caches only "
                "in that worker's copy; pass store='features.zarr' to share the cache."
            )

    # -- the pipeline ------------------------------------------------------------------------------

    def loader(
        self,
        batch_size: int | None = None,
        *,
        shuffle: bool = False,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        drop_last: bool = False,
        sampler: Sampler[int] | None = None,
        collate_fn: Collate | None = None,
        worker_method: WorkerMethod = "thread",
        prefetch_factor: int = 2,
        device: str | torch.device | None = None,
    ) -> Loader:
        """A resumable batch loader: workers do I/O, the module runs in this process.

        See :class:`cachedfeatures.pipeline.nodes.Loader` for the arguments; ``batch_size`` defaults
        to this dataset's ``batch_size``, and ``collate_fn`` to :attr:`pad_collate` when the entry
        has ragged (variable-length) arrays, else ``default_collate``; both make each batch
        straight from the stored columns. ``device="cuda"`` delivers batches on the GPU (pinned,
        ``non_blocking`` copies).
        """
        if collate_fn is None and self.ragged_positions():
            collate_fn = self.pad_collate  # default_collate cannot stack rows of different lengths
        self._restart_view_helpers(num_workers, worker_method)
        return Loader(
            self,
            batch_size=self.batch_size if batch_size is None else batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            drop_last=drop_last,
            sampler=sampler,
            collate_fn=collate_fn,
            worker_method=worker_method,
            prefetch_factor=prefetch_factor,
            device=device,
        )

    def on_device(
        self, device: str | torch.device = "cuda", *, collate_fn: Collate | None = None
    ) -> DeviceFeatures:
        """Every stored row copied to ``device`` once, so that each batch is a gather there.

        For features that fit in GPU memory: ``features.batches(256, shuffle=True)`` serves the
        epochs ``loader(256, shuffle=True)`` serves (same order, same views), already on the device,
        with no reads, collation or host-to-device copies per batch. It serves stored rows only:
        fill the entry first (:meth:`prefill`, or an epoch of :meth:`loader`); rows stored later
        are not seen. Spot checks still run once per epoch. See
        :class:`~cachedfeatures.pipeline.resident.DeviceFeatures`.

        Raises:
            RowsNotCachedError: some rows are not stored yet.
            InvalidArgumentError: the entry does not fit the device's free memory, or has
                variable-length arrays.
        """
        return DeviceFeatures(self, device, collate_fn)

    def prefill(
        self,
        num_workers: int = 0,
        progress: bool = True,
        *,
        worker_method: WorkerMethod = "thread",
        distributed: bool | None = None,
        check_valid: bool = True,
        timeout: float | timedelta | None = None,
        views: Sequence[int] | None = None,
    ) -> PrefillResult:
        """Compute and store every missing row, with a progress bar; resumable.

        ``views``: with ``views=K``, fill only these view numbers (``[0, 1]``); default all
        ``K``. The rest are computed when first served. See
        :func:`cachedfeatures.pipeline.prefill.prefill` for the other arguments.
        """
        if views is not None and self._views is None:
            raise InvalidArgumentError(
                "prefill(views=...) needs a dataset with views: pass views=K to cache K draws."
            )
        self._restart_view_helpers(num_workers, worker_method)
        return prefill(
            self,
            num_workers=num_workers,
            progress=progress,
            worker_method=worker_method,
            distributed=distributed,
            check_valid=check_valid,
            timeout=timeout,
            rows=None if self._views is None else self.view_rows(views),  # never a view's padding
        )

    def _restart_view_helpers(self, num_workers: int, worker_method: str) -> None:
        """Seeded loads that thread workers ask for run in helper processes: as many as workers,
        forked afresh (they see the dataset as it is now)."""
        if self._views is not None and worker_method == "thread":
            self._views.restart_helpers(max(1, num_workers))

    # -- introspection -------------------------------------------------------------------------

    @property
    def entry(self) -> Entry | None:
        """The store entry this dataset reads and writes (``None`` for an empty dataset)."""
        return None if self._binding is None else self._binding.entry

    @property
    def store(self) -> FeatureStore:
        return self._opened.store if self._binding is None else self._binding.store

    @property
    def module_calls(self) -> int:
        """How many batches this process has run through the module (spot checks included)."""
        return self._computer.calls

    @property
    def spot_checked_rows(self) -> list[int]:
        """The rows this process has loaded, recomputed and compared in spot checks, in order.

        A row checked twice appears twice; these are the only raw loads of hits.
        """
        return list(self._spot.here().checked_rows)

    @property
    def spot_check_calls(self) -> int:
        """Module batches this process has run for spot checks (part of :attr:`module_calls`)."""
        return self._spot.here().module_calls

    def __repr__(self) -> str:
        valid = 0 if self._binding is None else int(self._binding.entry.valid_mask().sum())
        rows = self._length * (self.views or 1)
        views = "" if self._views is None else f" ({self._views.views} views of {self._length} samples)"
        return (
            f"CachedFeatureDataset({qualified_name(self.dataset)}, {type(self.module).__name__}, "
            f"store={self.store.location!r}, entry={self.entry_name!r}, "
            f"{valid}/{rows} rows cached{views})"
        )

    def flush_access(self) -> None:
        """Write this process's pending chunk access statistics to the store now.

        They are also written every few seconds while reading, and when the process exits.
        """
        if self._binding is not None:
            self._binding.flush_access()

    def flush(self) -> None:
        """Store the misses this process computed and still holds, then its access statistics.

        Misses computed for a plain DataLoader's batches are held per process (this one, or
        each worker) and written a whole chunk at a time (see docs/concepts/pipeline.md); they
        are also written when a chunk is complete, past a byte budget, after a hold of about
        10 s, and when the process exits; a worker's also after a second without a miss, at its
        first batch of a new epoch and at SIGTERM (how persistent workers end). This call
        reaches only this process's rows, not a worker's. Rows become valid only once written.
        """
        if self._binding is not None:
            self._binding.flush_writes()
            self._binding.flush_access()

    def close(self) -> None:
        """:meth:`flush`, and end the helper processes of ``views=`` loads; the dataset stays
        usable (a later miss is held again, a later load starts new helpers)."""
        self.flush()
        if self._views is not None:
            self._views.close()

    @property
    def held_bytes(self) -> int:
        """Bytes of computed rows this process holds for writing, not yet stored."""
        return 0 if self._binding is None else self._binding.held_bytes


# -- helpers ------------------------------------------------------------------------------------


_FETCH_FILE = os.path.join("torch", "utils", "data", "_utils", "fetch.py")


def _batch_of_a_dataloader() -> bool:
    """Whether this ``__getitems__`` serves a DataLoader's batch: called by its fetcher, in this
    process (``num_workers=0``; ``StatefulDataLoader`` too) or in a worker process.

    Only those misses are held in the write-back buffer: a DataLoader epoch is where a shuffled
    batch would rewrite every chunk, and the next batches (completing each chunk), the byte
    budget, the hold time and the exit hook write them; in a worker also a SIGTERM (how a
    persistent worker ends at program exit), an idle second (the end of an epoch) and a held
    row asked for again (the next epoch), see :mod:`cachedfeatures.binding`. A direct
    ``cached[i]`` stores its rows before it returns, so that another dataset or reader in this
    process sees them. A wrapper the search does not see through only makes rows stored at once.
    """
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(8):  # the fetcher, through a few wrappers (Subset, ConcatDataset, ...)
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith(_FETCH_FILE):
            return True
        frame = frame.f_back
    return False


try:  # a private module of torch's: without it, samples are served as they are
    from torch.utils.data._utils.fetch import _MapDatasetFetcher

    _FETCH_CODE: types.CodeType | None = _MapDatasetFetcher.fetch.__code__
except (ImportError, AttributeError):
    _FETCH_CODE = None
_SUBSET_CODE = getattr(Subset.__getitems__, "__code__", None)


def _collate_fn_of_fetcher(frame: types.FrameType | None) -> object | None:
    """The collate function of torch's map-style fetcher if ``frame`` is its ``fetch`` (through
    ``Subset``s), which hands what ``__getitems__`` returns straight to it; else ``None``."""
    while frame is not None and frame.f_code is _SUBSET_CODE:
        frame = frame.f_back
    if frame is None or _FETCH_CODE is None or frame.f_code is not _FETCH_CODE:
        return None
    return getattr(frame.f_locals.get("self"), "collate_fn", None)


def _check_ragged_names(
    ragged: Mapping[str, str | bool], outputs: OutputLayout, sample: SampleLayout
) -> None:
    """A clear error for a ``ragged=`` name that is no output or field of the entry."""
    known = {spec.name for spec in (*outputs.arrays, *sample.fields)}
    known |= {str(key) for key in outputs.keys} if outputs.kind != "tensor" else set()
    unknown = sorted(set(ragged) - known)
    if unknown:
        raise ValueError(
            f"Expected the names in ragged= to be module outputs {[s.name for s in outputs.arrays]} or "
            f"fields {[s.name for s in sample.fields]}. Got {unknown}."
        )


def _warn_if_state_changed(module: Any, before: Mapping[str, str]) -> None:
    """Warn when running the module changed attributes that its fingerprint covers."""
    after = module_state_digests(module)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if changed:
        warnings.warn(
            f"running {type(module).__name__} changed its attributes {', '.join(changed[:6])}, which are "
            "part of its fingerprint: a CachedFeatureDataset built after the module has run would "
            "get a new entry and recompute everything. If they do not change what the module "
            "computes (counters, logs, caches), list them in the class attribute "
            f"__cachedfeatures_exclude__ = {tuple(n.rsplit('.', 1)[-1] for n in changed[:6])!r}.",
            FingerprintWarning,
            stacklevel=4,
        )


def _entry_prefix(module: Callable[..., Any]) -> str:
    """A readable start of the entry's name: the module's class, or the callable's name."""
    if isinstance(module, torch.nn.Module):
        return type(module).__name__
    target = getattr(module, "func", module)  # a functools.partial names its function
    name = re.sub(r"[^A-Za-z0-9_]", "", str(getattr(target, "__name__", type(module).__name__)))
    return name or "function"
