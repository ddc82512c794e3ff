"""``views=K``: K reproducible augmentation draws per sample, one served per epoch.

Every served view is compared exactly with the module's output on the sample loaded under that
view's seed, computed here without the cache; in fresh processes and DataLoader workers too.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cachedfeatures import CachedFeatureDataset
from cachedfeatures.cli import main
from cachedfeatures.compute.views import view_seed
from cachedfeatures.errors import InvalidArgumentError, NonDeterministicDatasetError
from cachedfeatures.store.explore import entry_info
from tests.helpers import Augmented, Backbone, run_process, run_script

N, K, CHUNK_ROWS, BATCH = 40, 3, 16, 8


def _cached(store: Path, n: int = N, **options: object) -> CachedFeatureDataset:
    settings: dict[str, object] = {"views": K, "chunk_rows": CHUNK_ROWS, "batch_size": BATCH, "spot_check": 0}
    settings.update(options)
    return CachedFeatureDataset(Augmented(n), Backbone(), store, **settings)  # type: ignore[arg-type]


@functools.cache
def expected_views(n: int = N, views: int = K, seed: int = 0) -> torch.Tensor:
    """``(n, views, features)``: each view computed directly, its sample loaded under its seed."""
    dataset, module = Augmented(n), Backbone()
    out = []
    for index in range(n):
        row = []
        for view in range(views):
            s = view_seed(seed, index, view)
            torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
            python_state = random.getstate()
            torch.manual_seed(s)
            np.random.seed([s & 0xFFFFFFFF, s >> 32])
            random.seed(s)
            image, _ = dataset[index]
            torch.set_rng_state(torch_state)
            np.random.set_state(numpy_state)
            random.setstate(python_state)
            with torch.inference_mode():
                row.append(Backbone.forward(module, image[None])[0])
        out.append(torch.stack(row))
    return torch.stack(out)


def served_views(batches: list[tuple[torch.Tensor, torch.Tensor]], expected: torch.Tensor) -> dict[int, int]:
    """Which view each served sample is, asserting it equals that view exactly."""
    found: dict[int, int] = {}
    for features, indices in batches:
        for feature, index in zip(features, indices.tolist(), strict=True):
            matches = [v for v in range(expected.shape[1]) if torch.equal(feature, expected[index, v])]
            assert len(matches) == 1, f"sample {index}: served features equal none (or several) of its views"
            assert index not in found, f"sample {index} served twice in one epoch"
            found[index] = matches[0]
    return found


def test_each_epoch_serves_exact_views_and_k_epochs_serve_every_view_once(store_path: Path) -> None:
    cached, expected = _cached(store_path), expected_views()
    assert len(cached) == N and cached.entry is not None
    assert cached.entry.num_rows == K * 48  # each view starts on a chunk boundary
    assert len({tuple(v.flatten().tolist()) for v in expected[0]}) == K  # the draws differ
    per_sample: dict[int, list[int]] = {i: [] for i in range(N)}
    for epoch in range(2 * K):
        cached.set_epoch(epoch)
        views = served_views(list(DataLoader(cached, batch_size=BATCH, shuffle=True)), expected)
        assert sorted(views) == list(range(N))
        for index, view in views.items():
            per_sample[index].append(view)
    for index, views in per_sample.items():
        assert sorted(views[:K]) == list(range(K)) and sorted(views[K:]) == list(range(K)), index
    assert int(cached.entry.valid_mask().sum()) == N * K  # every view was filled on first use
    calls = cached.module_calls
    cached.set_epoch(0)
    list(DataLoader(cached, batch_size=BATCH))
    assert cached.module_calls == calls  # hits never run the module


@pytest.mark.slow
def test_views_in_persistent_workers_of_a_fresh_process_are_exact(store_path: Path) -> None:
    """A fresh process fills through persistent DataLoader workers (set_epoch reaches them) and
    serves every view of every sample once over K epochs; values equal the direct computation."""
    result = run_script(
        f"""
        import json, sys
        import torch
        from torch.utils.data import DataLoader
        from cachedfeatures import CachedFeatureDataset
        from tests.helpers import Augmented, Backbone
        cached = CachedFeatureDataset(Augmented({N}), Backbone(), sys.argv[1], views={K},
                                      chunk_rows={CHUNK_ROWS}, batch_size={BATCH}, spot_check=0)
        loader = DataLoader(cached, batch_size={BATCH}, shuffle=True, num_workers=2, persistent_workers=True)
        epochs = []
        for epoch in range({K}):
            cached.set_epoch(epoch)
            epochs.append([[f.tolist(), int(i)] for x, y in loader for f, i in zip(x, y)])
        print(json.dumps({{"epochs": epochs}}))
        """,
        str(store_path),
    )
    expected = expected_views()
    # Workers hold their rows and store them by chunk, when idle, or as the program ends them.
    assert int(_cached(store_path).entry.valid_mask().sum()) == N * K
    per_sample: dict[int, list[int]] = {i: [] for i in range(N)}
    for epoch in result["epochs"]:
        batch = (torch.tensor([f for f, _ in epoch]), torch.tensor([i for _, i in epoch]))
        for index, view in served_views([batch], expected).items():
            per_sample[index].append(view)
    assert all(sorted(views) == list(range(K)) for views in per_sample.values())
    # and this process reads the same views as hits
    cached = _cached(store_path)
    cached.set_epoch(1)
    served_views(list(DataLoader(cached, batch_size=BATCH)), expected)
    assert cached.module_calls == 0


def test_loader_counts_epochs_and_seeded_loads_in_threads_ignore_the_training_loops_draws(
    store_path: Path,
) -> None:
    """loader() thread workers fill while the training loop draws from torch's generator (as dropout
    does): the views stay exact (they are loaded in helper processes), and the loop's own random
    stream is not replayed."""
    cached, expected = _cached(store_path), expected_views()
    loader = cached.loader(batch_size=BATCH, shuffle=True, num_workers=2)
    per_sample: dict[int, list[int]] = {i: [] for i in range(N)}
    torch.manual_seed(123)
    draws = []
    for _ in range(K):
        batches = []
        for features, indices in loader:
            draws.append(float(torch.rand(())))  # the training loop's own draws
            batches.append((features, indices))
        for index, view in served_views(batches, expected).items():
            per_sample[index].append(view)
    assert all(sorted(views) == list(range(K)) for views in per_sample.values())
    torch.manual_seed(123)
    assert draws == [float(torch.rand(())) for _ in draws]  # nobody reseeded or rewound them


def test_a_resumed_loader_serves_the_same_views(store_path: Path) -> None:
    cached = _cached(store_path)
    cached.prefill(progress=False)
    loader = cached.loader(batch_size=BATCH, shuffle=True)
    list(loader)  # epoch 0
    iterator = iter(loader)  # epoch 1
    next(iterator)
    state = loader.state_dict()
    rest = [(f.clone(), i.clone()) for f, i in iterator]
    resumed = _cached(store_path).loader(batch_size=BATCH, shuffle=True)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(again) == len(rest)
    for (f1, i1), (f2, i2) in zip(rest, again, strict=True):
        assert torch.equal(i1, i2) and torch.equal(f1, f2)


def test_random_schedule_draws_views_per_sample_and_epoch(store_path: Path) -> None:
    cached, expected = _cached(store_path, view_schedule="random"), expected_views()
    counts = np.zeros(K, dtype=int)
    for epoch in range(6):
        cached.set_epoch(epoch)
        for view in served_views(list(DataLoader(cached, batch_size=BATCH)), expected).values():
            counts[view] += 1
    assert counts.sum() == 6 * N and counts.min() > 0.2 * 6 * N / K


def test_prefill_fills_chosen_views_and_coverage_is_shown_per_view(store_path: Path) -> None:
    cached = _cached(store_path)
    result = cached.prefill(views=[0, 2], progress=False)
    assert result.computed == 2 * N - 1  # the probe row (of view 0) was stored at creation
    assert cached.entry is not None
    info = entry_info(cached.entry)
    assert info.views_valid == (N, 0, N)
    assert "valid 100%, 0%, 100% of 40 samples" in repr(cached.entry)
    calls = cached.module_calls
    assert cached.prefill(views=[0, 2], progress=False).computed == 0 and cached.module_calls == calls
    with pytest.raises(InvalidArgumentError, match="from 0 to 2"):
        cached.prefill(views=[3], progress=False)


def test_a_dataset_drawing_from_its_own_generator_is_refused_until_it_is_passed(store_path: Path) -> None:
    with pytest.raises(NonDeterministicDatasetError, match=r"view_generators=\[generator\]"):
        CachedFeatureDataset(Augmented(N, own_generator=True), Backbone(), store_path, views=K)
    dataset = Augmented(N, own_generator=True)
    assert dataset.generator is not None
    cached = CachedFeatureDataset(
        dataset, Backbone(), store_path, views=K, view_generators=[dataset.generator], spot_check=0
    )
    first = cached.load_view(5, 1)[0]
    assert torch.equal(first, cached.load_view(5, 1)[0])
    assert not all(torch.equal(first, cached.load_view(5, v)[0]) for v in (0, 2))


def test_views_are_part_of_the_entry_key_and_contradicting_options_fail(store_path: Path) -> None:
    names = {
        _cached(store_path, views=2).entry_name,
        _cached(store_path, views=3).entry_name,
        _cached(store_path, views=3, view_seed=1).entry_name,
    }
    assert len(names) == 3
    with pytest.raises(InvalidArgumentError, match="pass one of them"):
        _cached(store_path, allow_nondeterministic=True)
    with pytest.raises(NonDeterministicDatasetError, match="views=K"):  # the hint where it is needed
        CachedFeatureDataset(Augmented(N), Backbone(), store_path)


def test_spot_checks_recompute_views_under_their_seeds(store_path: Path) -> None:
    cached = _cached(store_path, spot_check=4)
    cached.prefill(progress=False)
    assert cached.spot_check(12) == 12  # equal, not stale: each row recomputed under its view's seed
    cached.set_epoch(2)
    list(DataLoader(cached, batch_size=BATCH))
    assert len(cached.spot_checked_rows) >= 12


def test_an_epoch_served_twice_without_set_epoch_logs_how_to_fix_it(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cached = _cached(store_path)
    with caplog.at_level(logging.WARNING, logger="cachedfeatures"):
        for _ in range(2):
            list(DataLoader(cached, batch_size=BATCH))
    assert sum("set_epoch" in record.getMessage() for record in caplog.records) == 1


class RandomCrop(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Token ids of 12 per sample, randomly cropped to 4..12 of them: views of different lengths."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = (torch.arange(12) * 7 + index) % 50
        keep = int(torch.randint(4, 13, ()))
        return {"tokens": tokens[:keep], "label": torch.tensor(index)}


class Embed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(
            torch.randn(50, 4, generator=torch.Generator().manual_seed(0)), requires_grad=False
        )

    def forward(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.table[tokens] for tokens in batch]


def test_ragged_views_store_each_draw_unpadded(store_path: Path) -> None:
    cached = CachedFeatureDataset(
        RandomCrop(), Embed().eval(), store_path, input_key="tokens", collate_fn=list, views=2, spot_check=0
    )
    seen: dict[int, set[int]] = {i: set() for i in range(24)}
    for epoch in range(2):
        cached.set_epoch(epoch)
        for sample in cached.__getitems__(list(range(24))):
            index = int(sample["label"])
            view = cached.views_of([index], epoch)[0]
            raw = cached.load_view(index, int(view))["tokens"]
            assert torch.equal(sample["tokens"], Embed().table[raw])  # exact, unpadded
            seen[index].add(len(raw))
    assert any(len(lengths) == 2 for lengths in seen.values())  # the views differ in length


def test_cli_info_shows_each_views_coverage(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cached = _cached(store_path)
    cached.prefill(views=[1], progress=False)
    assert main(["info", str(store_path)]) == 0
    probe_share = f"{100 / N:.0f}%"  # the probe row of view 0, stored at creation
    assert (
        f"views       {K} per sample; valid {probe_share}, 100%, 0% of {N} samples" in capsys.readouterr().out
    )
    assert main(["info", "--json", str(store_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["entries"][0]["views_valid"] == [1, N, 0]  # the probe row of view 0, and view 1


@pytest.mark.parametrize("unpicklable", [False, True], ids=["helper-dies", "unpicklable-error"])
def test_a_failing_helper_process_raises_instead_of_hanging(store_path: Path, unpicklable: bool) -> None:
    result = run_script(
        f"""
        import faulthandler, json, sys
        faulthandler.dump_traceback_later(100, exit=True)  # a hang shows where, then fails
        from cachedfeatures import CachedFeatureDataset, ViewLoadError
        from tests.helpers import Backbone, DiesInHelpers
        cached = CachedFeatureDataset(DiesInHelpers(24, fatal=5, unpicklable={unpicklable}), Backbone(),
                                      sys.argv[1], views=2, batch_size=4, spot_check=0)
        try:
            cached.prefill(num_workers=2, progress=False)
            outcome = "no error"
        except ViewLoadError as error:
            outcome = str(error)
        cached.close()
        print(json.dumps({{"outcome": outcome}}))
        """,
        str(store_path),
        timeout=120,  # a hang fails here
    )
    expected = "TwoArgumentError: s3://bucket/key: 503" if unpicklable else "died"
    assert expected in result["outcome"]


def test_a_new_loader_per_epoch_moves_on_and_follows_set_epoch(store_path: Path) -> None:
    cached, expected = _cached(store_path), expected_views()
    per_sample: dict[int, list[int]] = {i: [] for i in range(N)}
    for _ in range(K):  # a new loader every epoch, as a training script often makes
        for index, view in served_views(list(cached.loader(batch_size=BATCH)), expected).items():
            per_sample[index].append(view)
    assert all(sorted(views) == list(range(K)) for views in per_sample.values())
    cached.set_epoch(1)
    assert served_views(list(cached.loader(batch_size=BATCH)), expected) == {
        i: int(cached.views_of([i], 1)[0]) for i in range(N)
    }


def test_helper_processes_end_at_close(store_path: Path) -> None:
    before = set(multiprocessing.active_children())
    cached = _cached(store_path)
    list(cached.loader(batch_size=BATCH, num_workers=2))  # thread workers: loads in helpers
    assert len(set(multiprocessing.active_children()) - before) == 2
    cached.close()
    for _ in range(100):
        if not set(multiprocessing.active_children()) - before:
            break
        time.sleep(0.05)
    assert not set(multiprocessing.active_children()) - before


def test_seeded_loads_leave_cuda_generators_alone(store_path: Path) -> None:
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)  # where a CUDA seed waits for CUDA
    if tracker is None:
        pytest.skip("this torch keeps no lazy CUDA seed to compare")
    cached = _cached(store_path)
    torch.manual_seed(123)
    queued = tracker.manual_seed_all_cb
    cached.__getitems__(list(range(N)))
    cached.load_view(3, 1)
    assert tracker.manual_seed_all_cb is queued


def test_a_view_generators_state_is_not_part_of_the_key(store_path: Path) -> None:
    names = set()
    for state in (1, 2):
        dataset = Augmented(N, own_generator=True)
        assert dataset.generator is not None
        dataset.generator.manual_seed(state)  # as an unseeded generator differs from run to run
        names.add(_cached(store_path, view_generators=[dataset.generator]).entry_name)
    assert len(names) == 1


def test_an_epoch_reads_one_chunk_per_block_of_samples(store_path: Path) -> None:
    cached = _cached(store_path)  # N = 40 samples, chunks of 16: 3 blocks
    for epoch in range(2 * K):
        chunks = np.unique(cached.rows_of(np.arange(N), epoch) // CHUNK_ROWS)
        assert len(chunks) == 3


def test_bad_indices_epochs_and_views_say_what_is_expected(store_path: Path) -> None:
    cached = _cached(store_path)
    for indices in ([N], [-1], [0.5]):
        with pytest.raises(InvalidArgumentError, match="sample indices from 0 to 39"):
            cached.rows_of(indices, 0)
    with pytest.raises(InvalidArgumentError, match="epoch to be an int"):
        cached.rows_of([0], -1)
    with pytest.raises(InvalidArgumentError, match="epoch to be an int"):
        cached.set_epoch(1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="epoch to be an int"):
        cached.set_epoch(2**70)
    assert cached.prefill(views=1, progress=False).computed == N  # one view number is fine


@pytest.mark.slow
def test_the_set_epoch_warning_counts_across_dataloader_workers(store_path: Path) -> None:
    script = f"""
        import sys
        from torch.utils.data import DataLoader
        from tests.test_views import _cached
        from pathlib import Path
        cached = _cached(Path(sys.argv[1]))
        for _ in range(3):
            list(DataLoader(cached, batch_size={BATCH}, num_workers=2))
        """
    result = run_process(script, str(store_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("without set_epoch()") == 1
