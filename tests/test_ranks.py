"""One rank discovery: chunk ownership, prefill and the sampler read the same rank."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from cachedfeatures import ChunkOwnership, ChunkShuffleSampler
from cachedfeatures.store.ranks import ProcessRank, discover_rank


@pytest.fixture(autouse=True)
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_a_plain_process_is_rank_0_of_1() -> None:
    assert discover_rank() == ProcessRank(0, 1, "single process")
    assert ChunkOwnership.from_env() == ChunkOwnership(0, 1)
    sampler = ChunkShuffleSampler(100, chunk_rows=10)
    assert (sampler.rank, sampler.world_size) == (0, 1)


def test_torchrun_variables_give_the_rank_to_every_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert discover_rank() == ProcessRank(3, 4, "environment")
    assert not discover_rank().from_process_group
    assert ChunkOwnership.from_env() == ChunkOwnership(3, 4)
    # The sampler used to see one rank here (it asked the process group only).
    sampler = ChunkShuffleSampler(100, chunk_rows=10)
    assert (sampler.rank, sampler.world_size) == (3, 4)
    assert len(sampler) == 25


@pytest.mark.parametrize(
    "rank,world_size", [("x", "4"), ("4", "4"), ("-1", "2"), ("0", "0"), ("1", None), (None, "zero")]
)
def test_bad_torchrun_variables_say_what_is_expected(
    monkeypatch: pytest.MonkeyPatch, rank: str | None, world_size: str | None
) -> None:
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size)):
        if value is not None:
            monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"Expected the environment variables RANK and WORLD_SIZE .* Got"):
        discover_rank()


@pytest.fixture
def gloo_group(tmp_path: Path) -> Iterator[None]:
    """A real one-process gloo group, initialised in this process and destroyed after."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_without_the_environment_only_a_process_group_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "x")  # not even read
    assert discover_rank(environment=False) == ProcessRank(0, 1, "single process")


def test_an_initialised_process_group_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, gloo_group: None
) -> None:
    monkeypatch.setenv("RANK", "3")  # stale variables of another job: the group is what runs
    monkeypatch.setenv("WORLD_SIZE", "4")
    found = discover_rank()
    assert found == ProcessRank(0, 1, "process group") and found.from_process_group
    assert ChunkOwnership.from_env() == ChunkOwnership(0, 1)
    sampler = ChunkShuffleSampler(100, chunk_rows=10)
    assert (sampler.rank, sampler.world_size) == (0, 1)
