"""The three steps of a miss, kept apart so each can run where it belongs.

``load`` reads raw samples (any process or thread: it holds no module), ``compute`` runs the
module on loaded rows (only in the process that owns the device), and ``write`` stores the
result (synchronously through ``Entry.write``, or in the background through
:class:`cachedfeatures.store.writer.Writer`). ``CachedFeatureDataset.compute`` chains the three;
the pipeline in :mod:`cachedfeatures.pipeline.nodes` runs them on different workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from cachedfeatures.compute.layout import OutputLayout, SampleLayout
from cachedfeatures.compute.runner import FeatureComputer
from cachedfeatures.compute.views import ViewedSamples
from cachedfeatures.errors import CacheError

__all__ = ["LoadedRows", "RowLoader", "compute_loaded"]


@dataclass
class LoadedRows:
    """Raw samples of some rows: the module inputs and the passthrough fields to store.

    Args:
        rows: the dataset indices, one per input.
        inputs: what feeds the module, one per row (not yet collated).
        fields: each passthrough field as the array to store, one row per input.
    """

    rows: np.ndarray
    inputs: list[Any]
    fields: dict[str, np.ndarray]


class RowLoader:
    """Loads raw samples for rows; picklable and module-free, so it can run in workers.

    Args:
        dataset: the wrapped map-style dataset.
        layout: where the input and the fields sit in a sample.
    """

    def __init__(self, dataset: Dataset[Any], layout: SampleLayout) -> None:
        self.dataset = dataset
        self.layout = layout

    def __call__(self, rows: Sequence[int] | np.ndarray) -> LoadedRows:
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.dataset, ViewedSamples):  # seeded loads: where no other thread draws
            samples = self.dataset.load_rows(rows)
        else:
            samples = [self.dataset[int(i)] for i in rows]
        return LoadedRows(
            rows=rows,
            inputs=[self.layout.extract_input(sample) for sample in samples],
            fields=self.layout.field_values(samples, rows),
        )


def compute_loaded(
    computer: FeatureComputer,
    outputs: OutputLayout,
    loaded: LoadedRows,
    batch_size: int,
    *,
    pin_memory: bool = False,
) -> dict[str, np.ndarray]:
    """The columns to store for ``loaded`` rows: module outputs (in batches) and fields.

    Args:
        computer: runs the module on the device.
        outputs: the entry's output layout.
        loaded: rows from :class:`RowLoader`.
        batch_size: the module sees at most this many inputs per call.
        pin_memory: pin collated inputs so the copy to a CUDA device can be asynchronous.
    """
    rows = loaded.rows
    # Several batches are copied into one column each as they come (before the module's next
    # call, which may overwrite its last output); one batch is copied out of the module's
    # memory by the split, where a cast or a device copy has not done it already.
    several = len(rows) > batch_size
    columns: dict[str, np.ndarray] = {}
    if several:
        columns = {spec.name: spec.empty_column(len(rows)) for spec in outputs.arrays}
    for start in range(0, len(rows), batch_size):
        inputs = loaded.inputs[start : start + batch_size]
        try:
            part = computer(inputs, outputs, pin_memory=pin_memory, copy=not several)
        except CacheError:
            raise
        except Exception as error:
            batch = rows[start : start + batch_size]
            error.add_note(
                f"cachedfeatures: while computing features for rows {batch[:8].tolist()}"
                f"{'...' if len(batch) > 8 else ''}; nothing from this batch was stored."
            )
            raise
        for spec in outputs.arrays:
            values = spec.tensor_batch_to_numpy(part[spec.name])
            if several:
                columns[spec.name][start : start + len(inputs)] = values
            else:
                columns[spec.name] = values
    columns.update(loaded.fields)
    return columns
