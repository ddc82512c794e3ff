"""K cached views per sample: reproducible augmentation draws and which view an epoch serves.

``views=K`` caches K random draws of every sample instead of freezing one. View ``v`` of sample
``i`` is loaded with torch's, NumPy's and Python's global generators (and any extra generators
given) seeded from ``(seed, i, v)``, then restored, so it is the same draw in every process,
worker and run, and a cached row can be recomputed and compared like any other. The entry holds
the views one after another: row ``v * stride + i``, ``stride`` being ``N`` rounded up to whole
chunks, so that the rows one epoch reads of a block of samples are one chunk.

Seeding a global generator is only reproducible where no other thread draws from it meanwhile
(a training loop's dropout draws from torch's), and restoring it afterwards would replay another
thread's draws. So a seeded load runs in the calling thread only in a process's main thread (the
map-style path, a DataLoader worker, the probe); loads asked for from other threads (the
pipeline's workers and prefetcher) run in a small pool of helper processes forked on first use,
and seeded loads in one process take one lock.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import itertools
import multiprocessing
import os
import pickle
import random
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from cachedfeatures.errors import ArgumentTypeError, InvalidArgumentError, ViewLoadError
from cachedfeatures.parse import expected, parse_choice, parse_positive_int

__all__ = [
    "Generator",
    "Schedule",
    "ViewSchedule",
    "ViewedSamples",
    "check_views_options",
    "parse_schedule",
    "parse_view_generators",
    "parse_views",
    "seeded_generators",
    "view_seed",
]

Schedule = Literal["permutation", "random"]
Generator = torch.Generator | np.random.Generator | random.Random
"""An extra generator that ``views=`` seeds for each load, beside the global ones."""

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOCK = threading.RLock()  # one seeded load at a time in a process: the generators are global


def _mix(*parts: np.ndarray | int) -> np.ndarray:
    """A 64-bit hash of integer arrays (splitmix64 rounds), elementwise; vectorised."""
    state = np.zeros(np.broadcast(*[np.asarray(p) for p in parts]).shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            state = state ^ (np.asarray(part).astype(np.uint64) & _MASK)
            state = state + np.uint64(0x9E3779B97F4A7C15)
            state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            state = state ^ (state >> np.uint64(31))
    return state


def view_seed(seed: int, index: int, view: int) -> int:
    """The seed view ``view`` of sample ``index`` is loaded under (63 bits, the same everywhere)."""
    return int(_mix(seed & 0xFFFFFFFFFFFFFFFF, index, view)[()]) >> 1


@contextlib.contextmanager
def seeded_generators(seed: int, extra: Sequence[Generator] = ()) -> Iterator[None]:
    """Seed torch's CPU, NumPy's and Python's global generators and ``extra`` with ``seed``;
    restore them all on exit. Holds a process-wide lock meanwhile (the generators are global).

    CUDA's generators are left alone: a dataset draws its augmentation on the CPU, and a
    training loop's dropout on the GPU must not be reseeded or rewound.
    """
    with _LOCK:
        torch_state = torch.get_rng_state()
        numpy_state = np.random.get_state()
        python_state = random.getstate()
        extra_states = [_state_of(generator) for generator in extra]
        try:
            torch.default_generator.manual_seed(seed)  # the CPU one: CUDA's belongs to the training loop
            np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
            random.seed(seed)
            for generator in extra:
                _seed(generator, seed)
            yield
        finally:
            torch.set_rng_state(torch_state)
            np.random.set_state(numpy_state)
            random.setstate(python_state)
            for generator, state in zip(extra, extra_states, strict=True):
                _restore(generator, state)


def _state_of(generator: Generator) -> Any:
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    return generator.getstate()


def _seed(generator: Generator, seed: int) -> None:
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = type(generator.bit_generator)(seed).state
    else:
        generator.seed(seed)


def _restore(generator: Generator, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    else:
        generator.setstate(state)


class ViewedSamples(Dataset[Any]):
    """The rows of a ``views=K`` entry: row ``v * stride + i`` is sample ``i`` loaded as view ``v``.

    ``stride`` is ``N`` rounded up to whole chunks, so every view starts on a chunk boundary and
    a block of ``chunk_rows`` samples is one chunk of each view; the rows past ``N`` in a view's
    last chunk are never filled. It is set once the entry's ``chunk_rows`` is known.

    Args:
        dataset: the user's map-style dataset of ``N`` samples (random transforms included).
        views: ``K``, the draws cached per sample.
        seed: the base of every view's seed (:func:`view_seed`).
        generators: extra generators to seed per load, beside the global ones.
    """

    def __init__(
        self, dataset: Dataset[Any], views: int, seed: int, generators: Sequence[Generator] = ()
    ) -> None:
        self.dataset = dataset
        self.views = views
        self.seed = seed
        self.generators = tuple(generators)
        self.samples = len(dataset)  # type: ignore[arg-type]
        self.stride: int | None = None
        self.helper_processes = _HELPER_PROCESSES
        self._helpers: _Helpers | None = None
        self._broken: str | None = None  # why the helpers failed; cleared by restart_helpers()
        self._token = _register(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_helpers"], state["_broken"] = None, None  # helpers belong to the process that started them
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._token = _register(self)

    @staticmethod
    def stride_for(samples: int, chunk_rows: int) -> int:
        """Rows per view: ``samples`` rounded up to whole chunks."""
        return -(-samples // chunk_rows) * chunk_rows

    def _stride(self) -> int:
        if self.stride is None:
            raise RuntimeError("ViewedSamples.stride is set when the entry is bound")
        return self.stride

    def __len__(self) -> int:
        return self.views * self._stride()

    def __getitem__(self, row: int) -> Any:
        view, index = divmod(int(row), self._stride())
        if not (0 <= view < self.views and index < self.samples):
            raise IndexError(f"row {row} holds no view of a sample ({self.views} views of {self.samples}).")
        return self.view(index, view)

    def view(self, index: int, view: int) -> Any:
        """Sample ``index`` as drawn for view ``view``."""
        with seeded_generators(view_seed(self.seed, index, view), self.generators):
            return self.dataset[index]

    def row(self, index: int, view: int) -> int:
        """The entry row of view ``view`` of sample ``index``."""
        return view * self._stride() + index

    def load_rows(self, rows: Sequence[int] | np.ndarray) -> list[Any]:
        """The samples of entry ``rows``: here in a main thread (or where fork is missing), else
        in helper processes, where no other thread draws from the generators."""
        rows = [int(row) for row in rows]
        if threading.current_thread() is threading.main_thread() or not _CAN_FORK:
            return [self[row] for row in rows]
        with _LOCK:
            if self._broken is not None:  # no new helpers forked from a thread after a failure
                raise ViewLoadError(self._broken)
            helpers = self._helpers
            if helpers is None or helpers.pid != os.getpid():
                helpers = self._helpers = _Helpers(self.helper_processes)
                weakref.finalize(self, helpers.close)
        return helpers.load(self._token, rows, self)

    def restart_helpers(self, processes: int) -> None:
        """Fork ``processes`` helper processes now, ending any earlier ones (so they see the
        dataset as it is now): ``loader()`` and ``prefill()`` call it from the main thread before
        their threads start, since a fork from a thread while another runs torch could inherit
        locks held mid-operation."""
        self.close()
        self._broken = None
        self.helper_processes = max(1, processes)
        if _CAN_FORK:
            with _LOCK:
                helpers = self._helpers = _Helpers(self.helper_processes, start=True)
            weakref.finalize(self, helpers.close)

    def close(self) -> None:
        """End the helper processes (the next load off the main thread starts new ones)."""
        with _LOCK:
            helpers, self._helpers = self._helpers, None
        if helpers is not None and helpers.pid == os.getpid():
            helpers.close()


# -- helper processes -------------------------------------------------------------------------------

_HELPER_PROCESSES = 2  # default helper processes per dataset, until a loader or prefill sets it
_CAN_FORK = "fork" in multiprocessing.get_all_start_methods()
# The datasets of this process by token: a forked helper inherits them, so nothing is pickled
# (the dataset may hold locks or open files) and nothing of __main__ runs again.
_SAMPLES: weakref.WeakValueDictionary[int, ViewedSamples] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


def _register(samples: ViewedSamples) -> int:
    token = next(_TOKENS)
    _SAMPLES[token] = samples
    return token


class _Helpers:
    """Forked processes that run seeded loads for threads other than the main one."""

    def __init__(self, processes: int, start: bool = False) -> None:
        self.pid = os.getpid()
        self.executor = concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("fork"), initializer=_start_helper
        )
        if start:  # with fork, the first task forks every process
            self.executor.submit(int).result()

    def load(self, token: int, rows: list[int], samples: ViewedSamples) -> list[Any]:
        try:
            return self.executor.submit(_load_in_helper, token, rows).result()
        except concurrent.futures.process.BrokenProcessPool as error:
            message = (
                f"a helper process loading views of rows {rows[:8]} died (killed, out of memory, or "
                f"the dataset ended its process): {error}. Nothing of these rows was cached; fix the "
                "dataset (or give the machine more memory) and run again (the next loader() or "
                "prefill() starts new helpers), or load in worker_method='process' workers."
            )
            samples.close()
            samples._broken = message  # the other threads' loads fail too, at once
            raise ViewLoadError(message) from None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _start_helper() -> None:
    # One thread, like a DataLoader worker: no oversubscription, and no OpenMP team inherited
    # half-made from a parent that forked while computing.
    torch.set_num_threads(1)


def _load_in_helper(token: int, rows: list[int]) -> list[Any]:
    samples = _SAMPLES[token]
    try:
        return [samples[row] for row in rows]
    except Exception as error:
        try:  # the caller gets the dataset's own exception, where it survives pickling
            pickle.loads(pickle.dumps(error))
        except Exception:
            raise ViewLoadError(
                f"loading rows {rows[:8]} in a helper process failed with {type(error).__name__}: "
                f"{error} (the exception cannot be sent back whole: it does not pickle)."
            ) from None
        raise


class ViewSchedule:
    """Which view of each sample an epoch serves, as entry rows.

    ``"permutation"``: epochs go in cycles of ``K``; in cycle ``c`` every block of ``block``
    consecutive samples serves its views in the order of one permutation of the ``K`` views
    (drawn from ``(seed, c)``) shifted by an offset drawn from ``(seed, c, block)``, so over any
    cycle each sample is served each of its views exactly once, and the samples of a block read
    one view's consecutive rows (the chunks an epoch touches are those of one entry's worth of
    rows, not ``K`` times as many). Views are independent draws, so a block sharing a view
    number correlates nothing. ``"random"``: each sample's view is drawn uniformly per epoch.
    """

    def __init__(self, views: int, samples: int, stride: int, seed: int, kind: Schedule, block: int) -> None:
        self.views = views
        self.samples = samples
        self.stride = stride
        self.seed = seed
        self.kind = kind
        self.block = max(1, block)

    def views_of(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        """The view each of ``indices`` (sample indices) is served in ``epoch``."""
        indices = np.asarray(indices, dtype=np.int64)
        k = self.views
        if k == 1:
            return np.zeros(len(indices), dtype=np.int64)
        if self.kind == "random":
            return (_mix(self.seed, 1, epoch, indices) % np.uint64(k)).astype(np.int64)
        cycle, position = divmod(int(epoch), k)
        order = np.random.default_rng([self.seed & 0xFFFFFFFF, 2, cycle & 0xFFFFFFFF]).permutation(k)
        offsets = (_mix(self.seed, 3, cycle, indices // self.block) % np.uint64(k)).astype(np.int64)
        picked: np.ndarray = order[(position + offsets) % k]
        return picked

    def rows(self, indices: np.ndarray | Sequence[int], epoch: int) -> np.ndarray:
        """The entry rows that serve ``indices`` in ``epoch``."""
        indices = np.asarray(indices, dtype=np.int64)
        rows: np.ndarray = self.views_of(indices, epoch) * self.stride + indices
        return rows


# -- argument parsing -----------------------------------------------------------------------------


def parse_views(value: object) -> int | None:
    """``views=``: ``None`` (no views) or a positive int."""
    return None if value is None else parse_positive_int("views", value)


def parse_schedule(value: object) -> Schedule:
    """``view_schedule=``: ``"permutation"`` or ``"random"``."""
    return parse_choice("view_schedule", value, get_args(Schedule))  # type: ignore[return-value]


def parse_view_generators(value: object) -> tuple[Generator, ...]:
    """``view_generators=``: a sequence of torch / NumPy / ``random.Random`` generators."""
    if value is None:
        return ()
    items = [value] if isinstance(value, (torch.Generator, np.random.Generator, random.Random)) else value
    if not isinstance(items, (list, tuple)) or not all(
        isinstance(item, (torch.Generator, np.random.Generator, random.Random)) for item in items
    ):
        raise ArgumentTypeError(
            expected(
                "view_generators to be a list of torch.Generator, numpy.random.Generator or random.Random "
                "objects the dataset draws its augmentation from",
                value,
            )
        )
    return tuple(items)


def check_views_options(views: bool, allow_nondeterministic: bool) -> None:
    """``views=`` caches random draws reproducibly: the options that contradict it fail early."""
    if views and allow_nondeterministic:
        raise InvalidArgumentError(
            "views= caches reproducible random draws, each under its own seed, and "
            "allow_nondeterministic=True caches one unseeded draw: pass one of them."
        )
