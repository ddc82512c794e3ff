"""Looking into a store: what is cached, how full and how big it is, what the features hold.

The functions here back the exploration API of :class:`~cachedfeatures.store.feature_store.Entry` and
:class:`~cachedfeatures.store.feature_store.FeatureStore` (``entry.features()``, ``entry.to_xarray()``,
``entry.info()``, the Jupyter display). They only read the store.

Rows that are not valid hold no data a user may trust (never computed, pruned, or written
by a process that died before setting ``valid``), so no function here returns them as data:
reads take the valid rows only, and ask for a row that is not valid raises
:class:`~cachedfeatures.errors.RowsNotCachedError`.
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
import zarr

from cachedfeatures.errors import RowsNotCachedError, UnknownArrayError
from cachedfeatures.format.names import (
    ACCESS,
    CHUNK_CRC,
    NEXT_ROW,
    SAMPLE_DIM,
    STREAM_ROWS,
    VALID,
    offsets_name,
    values_name,
)
from cachedfeatures.format.ragged import ABSENT
from cachedfeatures.format.specs import ArraySpec
from cachedfeatures.parse import parse_choice
from cachedfeatures.store import access, chunk_bytes
from cachedfeatures.units import format_bytes, format_ratio

if TYPE_CHECKING:
    import xarray

    from cachedfeatures.store.feature_store import Entry, FeatureStore

__all__ = [
    "ArrayInfo",
    "EntryInfo",
    "chunk_nbytes",
    "entry_html",
    "entry_info",
    "entry_repr",
    "read_arrays",
    "store_html",
    "store_repr",
    "to_xarray",
]

ArrayFormat = Literal["numpy", "torch"]


@dataclass(frozen=True)
class ArrayInfo:
    """One stored array: its role (``"feature"`` for a module output, ``"field"`` otherwise)."""

    name: str
    role: Literal["feature", "field"]
    dtype: str
    shape: tuple[int | str, ...]  # a ragged array's rows: ("L", *inner)
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class EntryInfo:
    """A snapshot of what an entry holds, for display and for scripts.

    ``nbytes_stored`` is the entry's size on disk (chunks and metadata); ``nbytes_logical`` the
    uncompressed size of all its rows once full. ``compression_ratio`` is what the codecs
    achieve: the bytes the stored chunks decode to over the bytes they take (see
    :func:`cachedfeatures.store.chunk_bytes.compression_ratio`), the same figure
    ``cachedfeatures info`` prints.
    """

    name: str
    module: str
    dataset: str
    module_digest: str
    dataset_digest: str
    num_rows: int
    valid_rows: int
    chunk_rows: int
    num_chunks: int
    nbytes_stored: int
    nbytes_logical: int
    compression_ratio: float
    codecs: str
    arrays: tuple[ArrayInfo, ...]
    created: str
    last_used: _dt.datetime | None
    views_valid: tuple[int, ...] | None = None  # with views=K: valid rows of each view
    view_samples: int | None = None  # with views=K: the samples N (each view holds N rows)


# -- reading ---------------------------------------------------------------------------------


def parse_as(as_: object) -> ArrayFormat:
    return parse_choice("as_", as_, get_args(ArrayFormat))


def spec_of(entry: Entry, name: str) -> ArraySpec:
    """The spec of the array ``name``, or an error listing the arrays the entry has."""
    for spec in entry.specs:
        if spec.name == name:
            return spec
    raise UnknownArrayError(
        f"entry {entry.name!r} has no array {name!r}; its features are {entry.feature_names} and "
        f"its fields {entry.field_names}."
    )


def read_arrays(
    entry: Entry, names: Sequence[str], rows: Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows of the arrays ``names``, read together; ``rows=None`` means every valid row.

    Returns the row indices and one array per name, aligned with them. A requested row that
    is not valid raises :class:`RowsNotCachedError` instead of showing bytes nobody vouches for.
    """
    specs = [spec_of(entry, name) for name in names]
    if rows is None:
        return _read_valid(entry, specs)
    wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
    out_of_range = wanted[(wanted < 0) | (wanted >= entry.num_rows)]
    if len(out_of_range):
        raise IndexError(
            f"rows {out_of_range[:5].tolist()} are out of range for entry {entry.name!r} of "
            f"{entry.num_rows} rows; pass rows from 0 to {entry.num_rows - 1}."
        )
    if len(wanted) == 0:
        return wanted, {spec.name: _empty(spec) for spec in specs}
    found = entry.read(wanted)
    if not found.hit.all():
        missing = wanted[~found.hit]
        raise RowsNotCachedError(
            f"{len(missing)} of the {len(wanted)} rows asked for (e.g. {missing[:5].tolist()}) are not "
            f"cached in entry {entry.name!r}: they were never computed or have been pruned. Pass "
            "rows=entry.valid_rows() to read only cached rows, or fill the cache first (one pass "
            "over the CachedFeatureDataset)."
        )
    return wanted, {spec.name: found.arrays[spec.name] for spec in specs}


def _read_valid(entry: Entry, specs: Sequence[ArraySpec]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every valid row: whole runs of chunks are read with slices (much faster than fancy
    indexing), and a row counts only if it is valid before and after its bytes are read."""
    before = entry.valid_mask()
    has_rows = np.zeros(entry.num_chunks + 2, dtype=np.int8)
    if len(before):
        has_rows[1:-1] = np.add.reduceat(before, np.arange(0, entry.num_rows, entry.chunk_rows)) > 0
    edges = np.flatnonzero(np.diff(has_rows))  # runs of chunks that hold valid rows: [start, stop)
    spans = [
        (start * entry.chunk_rows, min(stop * entry.chunk_rows, entry.num_rows))
        for start, stop in zip(edges[::2], edges[1::2], strict=True)
    ]
    if not spans:
        return np.zeros(0, dtype=np.int64), {spec.name: _empty(spec) for spec in specs}
    columns = {spec.name: np.concatenate([_read_span(entry, spec, a, b) for a, b in spans]) for spec in specs}
    after = entry.valid_mask()
    candidates = np.concatenate([np.arange(a, b) for a, b in spans])
    keep = before[candidates] & after[candidates]
    if keep.all():
        return candidates, columns
    return candidates[keep], {name: column[keep] for name, column in columns.items()}


def _read_span(entry: Entry, spec: ArraySpec, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of array ``spec`` as stored (a ragged one as a 1-d object column)."""
    if spec.ragged:
        return _read_ragged(entry, spec.name, start, stop)
    return np.asarray(entry.arrays[spec.name][start:stop])


def _read_ragged(entry: Entry, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` (whole chunks) of ragged array ``name``, as a 1-d object column."""
    ragged = entry.ragged[name]
    column = np.empty(stop - start, dtype=object)
    for chunk in range(start // entry.chunk_rows, -(-stop // entry.chunk_rows)):
        first = chunk * entry.chunk_rows
        last = min(first + entry.chunk_rows, entry.num_rows)
        found = ragged.read_chunk(chunk, first, last)
        local = np.arange(last - first)
        found.gather(local, column, local + first - start)
    return column


def _empty(spec: ArraySpec) -> np.ndarray:
    return spec.empty_column(0)


def convert(spec: ArraySpec, rows: np.ndarray, as_: ArrayFormat) -> Any:
    """Stored rows as a NumPy array or a torch tensor of the dtype the module returned.

    bfloat16, which NumPy lacks, comes back as float32 in NumPy and as bfloat16 in torch.
    """
    if spec.ragged:  # one array (or tensor) per row, of its own length
        if as_ == "torch":
            return spec.numpy_to_tensors(rows)
        if spec.torch_dtype == "bfloat16":
            return [tensor.to(torch.float32).numpy() for tensor in spec.numpy_to_tensors(rows)]
        return list(rows)
    if as_ == "torch":
        if spec.kind == "str":
            raise TypeError(f"array {spec.name!r} holds strings, which torch cannot hold; pass as_='numpy'.")
        return spec.numpy_to_tensor(rows)
    if spec.torch_dtype == "bfloat16":
        return spec.numpy_to_tensor(rows).to(torch.float32).numpy()
    return rows


def to_xarray(entry: Entry, valid_only: bool = True) -> xarray.Dataset:
    """The entry as a lazily read ``xarray.Dataset`` with named dimensions.

    Features are data variables with dimensions ``(sample, <name>_dim1, ...)``; passthrough
    fields (labels, ids) are coordinates along ``sample``, as is ``sample`` itself (the row
    index in the wrapped dataset). With ``valid_only`` (default) only valid rows are kept;
    otherwise every row is kept, ``valid`` is a coordinate, and the data of rows that are not
    valid is masked to NaN (this reads the arrays into memory).
    """
    import xarray as xr

    group = entry.group
    # bookkeeping, not features (keyed entries' row counter and a stream's rows: not along sample)
    drop = [name for name in (ACCESS, CHUNK_CRC, NEXT_ROW, STREAM_ROWS) if name in group]
    dataset = xr.open_zarr(
        group.store,
        group=group.path,
        consolidated=False,
        zarr_format=3,
        drop_variables=drop,
    )
    dataset = dataset.assign_coords({SAMPLE_DIM: np.arange(entry.num_rows)})
    dataset = _with_ragged_values(entry, dataset)
    dataset = dataset.set_coords([name for name in entry.field_names if name in dataset])
    mask = entry.valid_mask()
    if valid_only:
        selected: xarray.Dataset = dataset.drop_vars(VALID)
        if not mask.all():  # (fancy indexing is slow in zarr; skip it when every row is valid)
            selected = selected.isel({SAMPLE_DIM: np.flatnonzero(mask)})
        return selected
    dataset = dataset.set_coords(VALID)
    valid = xr.DataArray(mask, dims=(SAMPLE_DIM,))
    offsets = {offsets_name(name) for name in entry.ragged}
    masked: xarray.Dataset = dataset.assign(
        {
            name: dataset[name].where(valid)
            for name in dataset.data_vars
            if SAMPLE_DIM in dataset[name].dims and name not in offsets  # offsets stay ints, -1: none
        }
    )
    return masked


def _with_ragged_values(entry: Entry, dataset: xarray.Dataset) -> xarray.Dataset:
    """``dataset`` with each ragged array as two variables: ``<name>.values`` (every valid row's
    values one after the other, along its own dimension ``<name>_value``; read into memory) and
    ``<name>.offsets`` ``(sample, bound)``, each row's ``[start, stop)`` in it (-1: no values)."""
    for spec in entry.specs:
        if not spec.ragged:
            continue
        rows, columns = _read_valid(entry, [spec])
        column = columns[spec.name]
        lengths = np.array([len(row) for row in column], dtype=np.int64)
        offsets = np.full((entry.num_rows, 2), ABSENT, dtype=np.int64)
        stops = np.cumsum(lengths)
        offsets[rows, 0], offsets[rows, 1] = stops - lengths, stops
        if len(column):
            flat = np.concatenate(list(column))
        else:
            flat = np.empty((0, *spec.shape), dtype=spec.numpy_dtype)
        dims = (f"{spec.name}_value", *(f"{spec.name}_dim{i}" for i in range(1, len(spec.shape) + 1)))
        dataset = dataset.drop_vars(offsets_name(spec.name), errors="ignore")
        dataset = dataset.assign(
            {offsets_name(spec.name): (("sample", "bound"), offsets), values_name(spec.name): (dims, flat)}
        )
    return dataset


# -- statistics ------------------------------------------------------------------------------


def chunk_nbytes(entry: Entry) -> np.ndarray:
    """Bytes on disk per chunk along the sample dimension, summed over all arrays.

    Temporary ``*.partial`` files (left by a killed writer) and metadata are not counted.
    """
    nbytes = np.zeros(entry.num_chunks, dtype=np.int64)
    for (_, chunk), size in chunk_bytes.array_chunk_sizes(entry).items():
        nbytes[chunk] += size
    return nbytes


def access_stats(entry: Entry) -> np.ndarray | None:
    """Per-chunk ``[last access unix time, access count]`` from the pruning layer, if recorded."""
    if ACCESS not in entry.group:
        return None
    array: Any = entry.group[ACCESS]
    return np.asarray(array[...], dtype=np.float64)


def last_used(entry: Entry) -> _dt.datetime | None:
    """When a chunk of the entry was last used (:func:`cachedfeatures.store.access.last_used`)."""
    latest = access.last_used(entry)
    return None if latest is None else _dt.datetime.fromtimestamp(latest, _dt.UTC)


def describe_codecs(array: zarr.Array[Any]) -> str:
    """A short description of an array's compression, e.g. ``blosc zstd clevel=3 shuffle``."""
    parts = []
    for codec in getattr(array.metadata, "codecs", ()):
        if isinstance(codec, zarr.codecs.BytesCodec):
            continue
        if isinstance(codec, zarr.codecs.BloscCodec):
            parts.append(f"blosc {codec.cname.value} clevel={codec.clevel} {codec.shuffle.value}")
        else:
            parts.append(type(codec).__name__.removesuffix("Codec").lower())
    return ", ".join(parts) or "none"


def compression_ratio(entry: Entry) -> float:
    """The bytes the entry's stored chunks decode to over their bytes on disk (``nan``: none);
    see :func:`cachedfeatures.store.chunk_bytes.compression_ratio`."""
    return chunk_bytes.compression_ratio(entry, chunk_bytes.array_chunk_sizes(entry))


def view_coverage(entry: Entry, mask: np.ndarray | None = None) -> tuple[int, ...] | None:
    """With ``views=K``: how many samples each view has cached (row ``v * stride + i``); else ``None``."""
    views = entry.meta.get("views")
    if not views:
        return None
    count, samples, stride = int(views["count"]), int(views["samples"]), int(views["stride"])
    mask = np.asarray(entry.valid_mask() if mask is None else mask, dtype=bool)
    return tuple(int(n) for n in mask.reshape(count, stride)[:, :samples].sum(axis=1))


def entry_info(entry: Entry) -> EntryInfo:
    feature_names = set(entry.feature_names)
    arrays = tuple(
        ArrayInfo(
            name=spec.name,
            role="feature" if spec.name in feature_names else "field",
            dtype=_dtype_name(spec),
            shape=("L", *spec.shape) if spec.ragged else spec.shape,
            chunks=tuple(_zarr_array(entry, spec.name).chunks[: 1 if spec.ragged else None]),
        )
        for spec in entry.specs
    )
    first = entry.feature_names[0] if entry.feature_names else entry.specs[0].name
    mask = entry.valid_mask()
    return EntryInfo(
        name=entry.name,
        module=entry.module_description,
        dataset=entry.dataset_description,
        module_digest=str(entry.meta["module"].get("digest", "")),
        dataset_digest=str(entry.meta["dataset"].get("digest", "")),
        num_rows=entry.num_rows,
        valid_rows=int(mask.sum()),
        chunk_rows=entry.chunk_rows,
        num_chunks=entry.num_chunks,
        nbytes_stored=entry.nbytes_stored(),
        nbytes_logical=entry.nbytes_logical(),
        compression_ratio=compression_ratio(entry),
        codecs=describe_codecs(_zarr_array(entry, first)),
        arrays=arrays,
        created=entry.created,
        last_used=last_used(entry),
        views_valid=view_coverage(entry, mask),
        view_samples=int(entry.meta["views"]["samples"]) if entry.meta.get("views") else None,
    )


def _zarr_array(entry: Entry, name: str) -> zarr.Array[Any]:
    """The zarr array of ``name``: the array itself, or a ragged array's offsets."""
    return entry.ragged[name].offsets if name in entry.ragged else entry.arrays[name]


def _dtype_name(spec: ArraySpec) -> str:
    if spec.torch_dtype is not None:
        return spec.torch_dtype
    return "str" if spec.dtype == "str" else spec.numpy_dtype.name


# -- text ------------------------------------------------------------------------------------


def plural(count: int, word: str) -> str:
    """``plural(1, "entry")`` -> ``'1 entry'``; ``plural(2, "entry")`` -> ``'2 entries'``."""
    if count == 1:
        return f"1 {word}"
    return f"{count} {word[:-1]}ies" if word.endswith("y") else f"{count} {word}s"


def _when(value: _dt.datetime | str | None) -> str:
    if value is None:
        return "never recorded"
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    return value.astimezone(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ratio(info: EntryInfo) -> str:
    return format_ratio(info.compression_ratio)


def _rows(info: EntryInfo) -> str:
    total = info.num_rows if info.view_samples is None else info.view_samples * len(info.views_valid or ())
    percent = 100 * info.valid_rows / total if total else 0.0
    return f"{info.valid_rows} / {total} valid ({percent:.0f}%)"


def views_text(valid: Sequence[int], samples: int) -> str:
    """``'4 per sample; valid 100%, 50%, 0%, 0% of 1000 samples'``: each view's coverage."""
    shares = ", ".join(f"{100 * n / samples:.0f}%" if samples else "0%" for n in valid)
    return f"{len(valid)} per sample; valid {shares} of {samples} samples"


def _array_text(array: ArrayInfo) -> str:
    shape = "(" + ", ".join(str(n) for n in array.shape) + ("," if len(array.shape) == 1 else "") + ")"
    return f"{array.name} {array.dtype}{shape}"


def entry_repr(info: EntryInfo) -> str:
    features = ", ".join(_array_text(a) for a in info.arrays if a.role == "feature")
    fields = ", ".join(_array_text(a) for a in info.arrays if a.role == "field") or "none"
    return "\n".join(
        [
            f"<Entry {info.name}>",
            f"  module   {info.module}",
            f"  dataset  {info.dataset}",
            f"  rows     {_rows(info)}, {info.num_chunks} chunks of {info.chunk_rows} rows",
            *(
                [f"  views    {views_text(info.views_valid, info.view_samples or 0)}"]
                if info.views_valid
                else []
            ),
            f"  on disk  {format_bytes(info.nbytes_stored)}, compression {_ratio(info)} ({info.codecs}); "
            f"{format_bytes(info.nbytes_logical)} uncompressed when full",
            f"  features {features}",
            f"  fields   {fields}",
            f"  created  {_when(info.created)}; last used {_when(info.last_used)}",
        ]
    )


def store_repr(store: FeatureStore, infos: Sequence[EntryInfo]) -> str:
    total = sum(info.nbytes_stored for info in infos)
    lines = [f"<FeatureStore {store.location}: {plural(len(infos), 'entry')}, {format_bytes(total)} on disk>"]
    for info in infos:
        lines.append(
            f"  {info.name}  {info.valid_rows}/{info.num_rows} rows  {format_bytes(info.nbytes_stored)}  "
            f"{_ratio(info)}  {info.module.split(',')[0]}"
        )
    return "\n".join(lines)


# -- HTML (Jupyter) --------------------------------------------------------------------------

_CELL = "padding:1px 8px;text-align:left;vertical-align:top"
_MAX_BARS = 120


def coverage_svg(mask: np.ndarray, chunk_rows: int, width: int = 180) -> str:
    """A small bar chart of the ``valid`` mask: rows left to right, filled where cached.

    Rows are grouped into at most 120 cells; each cell is filled to the share of its rows that
    are cached, with a tooltip (``<title>``) giving the counts. Thin white lines mark chunk
    boundaries when chunks are few enough to see. Plain inline SVG, no script.
    """
    num_rows = len(mask)
    if num_rows == 0:
        return ""
    height = 14
    cells = min(num_rows, _MAX_BARS)
    edges = np.linspace(0, num_rows, cells + 1).round().astype(np.int64)
    cached = np.add.reduceat(mask.astype(np.int64), edges[:-1])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" style="vertical-align:middle">',
        f'<rect width="{width}" height="{height}" fill="#e0e0e0"/>',
    ]
    scale = width / num_rows
    for first, end, count in zip(edges[:-1], edges[1:], cached, strict=True):
        rows = int(end - first)
        label = f"row {first}" if rows == 1 else f"rows {first}-{end - 1}"
        filled = height * int(count) / rows
        x, cell_width = f"{first * scale:.2f}", f"{rows * scale:.2f}"
        parts.append(
            f"<g><title>{label}: {count}/{rows} cached</title>"
            f'<rect x="{x}" y="0" width="{cell_width}" height="{height}" fill-opacity="0"/>'
            f'<rect x="{x}" y="{height - filled:.2f}" width="{cell_width}" height="{filled:.2f}" '
            f'fill="#2a7ab9"/></g>'
        )
    num_chunks = -(-num_rows // chunk_rows)
    if 1 < num_chunks <= width // 4:
        for chunk in range(1, num_chunks):
            boundary = chunk * chunk_rows * scale
            parts.append(
                f'<line x1="{boundary:.2f}" x2="{boundary:.2f}" y1="0" y2="{height}" stroke="white"/>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    out = ['<table style="border-collapse:collapse;font-size:90%">']
    if header is not None:
        out.append("<thead><tr>" + "".join(f'<th style="{_CELL}">{h}</th>' for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td style="{_CELL}">{cell}</td>' for cell in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _esc(value: object) -> str:
    return html.escape(str(value))


def entry_html(info: EntryInfo, mask: np.ndarray) -> str:
    """An entry as HTML: a summary table with a coverage bar, and a table of its arrays."""
    bar = coverage_svg(mask, info.chunk_rows)
    summary = _table(
        [
            ["<b>module</b>", f"{_esc(info.module)}<br><code>{_esc(info.module_digest)}</code>"],
            ["<b>dataset</b>", f"{_esc(info.dataset)}<br><code>{_esc(info.dataset_digest)}</code>"],
            ["<b>rows</b>", f"{bar} {_esc(_rows(info))}"],
            ["<b>chunking</b>", f"{info.num_chunks} chunks of {info.chunk_rows} rows"],
            [
                "<b>on disk</b>",
                f"{_esc(format_bytes(info.nbytes_stored))}, compression {_esc(_ratio(info))} "
                f"({_esc(info.codecs)}); {_esc(format_bytes(info.nbytes_logical))} uncompressed when full",
            ],
            ["<b>created</b>", _esc(_when(info.created))],
            ["<b>last used</b>", _esc(_when(info.last_used))],
        ]
    )
    arrays = _table(
        [
            [f"<code>{_esc(a.name)}</code>", a.role, _esc(a.dtype), _esc(a.shape), _esc(a.chunks)]
            for a in info.arrays
        ],
        header=["array", "role", "dtype", "row shape", "chunk shape"],
    )
    return f"<div><b>Entry</b> <code>{_esc(info.name)}</code>{summary}{arrays}</div>"


def store_html(store: FeatureStore, entries: Sequence[tuple[EntryInfo, np.ndarray]]) -> str:
    """A store as HTML: one table row per entry (``entries`` pairs its info with its valid mask)."""
    total = sum(info.nbytes_stored for info, _ in entries)
    rows = [
        [
            f"<code>{_esc(info.name)}</code>",
            _esc(info.module.split(",")[0]),
            _esc(info.dataset.split(",")[0]),
            f"{coverage_svg(mask, info.chunk_rows, width=120)} {info.valid_rows}/{info.num_rows}",
            _esc(format_bytes(info.nbytes_stored)),
            _esc(_ratio(info)),
            _esc(", ".join(f"{a.name} {a.dtype}{a.shape}" for a in info.arrays if a.role == "feature")),
            _esc(_when(info.created)),
            _esc(_when(info.last_used)),
        ]
        for info, mask in entries
    ]
    table = _table(
        rows,
        header=[
            "entry",
            "module",
            "dataset",
            "rows cached",
            "on disk",
            "compression",
            "features",
            "created",
            "last used",
        ],
    )
    title = (
        f"<b>FeatureStore</b> <code>{_esc(store.location)}</code>: {plural(len(entries), 'entry')}, "
        f"{_esc(format_bytes(total))} on disk"
    )
    return f"<div>{title}{table if entries else ''}</div>"
