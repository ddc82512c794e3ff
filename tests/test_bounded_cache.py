"""The one in-memory cache: a byte budget, an eviction policy, counters."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachedfeatures.reader.bounded_cache import POLICIES, BoundedCache, parse_policy


def sized(max_bytes: int | None, policy: str = "lru") -> BoundedCache[str, bytes]:
    return BoundedCache(max_bytes, policy, len)  # type: ignore[arg-type]


def test_a_wrong_policy_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"Expected policy to be one of 'mru', 'lru'. Got 'fifo'."):
        BoundedCache(10, "fifo")  # type: ignore[arg-type]
    assert set(POLICIES) == {"mru", "lru"} and parse_policy("mru") == "mru"


@pytest.mark.parametrize("value", [-1, 1.5, True, "10"])
def test_a_wrong_budget_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="Expected max_bytes to be a number of bytes"):
        BoundedCache(value, "lru")  # type: ignore[arg-type]


def test_lru_evicts_the_least_recently_used() -> None:
    cache = sized(30, "lru")
    for key in "abc":
        assert cache.put(key, b"x" * 10)
    assert cache.get("a") == b"x" * 10  # a is now the most recently used: b goes first
    cache.put("d", b"y" * 10)
    assert list(cache) == ["c", "a", "d"]
    assert cache.evictions == 1 and cache.nbytes == 30


def test_mru_evicts_the_most_recently_used() -> None:
    cache = sized(30, "mru")
    for key in "abc":
        cache.put(key, b"x" * 10)
    cache.get("a")
    cache.put("d", b"y" * 10)  # a was used last: it goes
    assert sorted(cache) == ["b", "c", "d"]


def test_mru_keeps_a_stable_subset_over_cyclic_passes_where_lru_hits_nothing() -> None:
    hits = {}
    for policy in ("mru", "lru"):
        cache = sized(40, policy)
        for _ in range(3):
            for key in "abcdefghij":  # ten items of 10 bytes, room for four
                if cache.get(key) is None:
                    cache.put(key, b"x" * 10)
        hits[policy] = cache.hits
    assert hits["lru"] == 0
    assert hits["mru"] >= 2 * 3  # at least three of the four held hit in each later pass


def test_an_item_larger_than_the_budget_is_not_kept_and_evicts_nothing() -> None:
    cache = sized(25)
    cache.put("a", b"x" * 10)
    cache.put("b", b"x" * 10)
    assert not cache.put("big", b"x" * 26)
    assert "big" not in cache and sorted(cache) == ["a", "b"]
    assert cache.evictions == 0 and cache.nbytes == 20


def test_replacing_a_key_counts_its_bytes_once() -> None:
    cache = sized(100)
    cache.put("a", b"x" * 10)
    cache.put("a", b"x" * 30)
    assert len(cache) == 1 and cache.nbytes == 30
    cache.discard("a")
    assert len(cache) == 0 and cache.nbytes == 0


def test_counters_and_explicit_sizes() -> None:
    cache: BoundedCache[int, object] = BoundedCache(100, "lru")
    with pytest.raises(TypeError, match="nbytes"):
        cache.put(1, object())  # no size function: each put says its size
    value = object()
    cache.put(1, value, nbytes=60)
    assert cache.get(1) is value and cache.get(2) is None
    cache.put(2, object(), nbytes=60)
    assert (cache.hits, cache.misses, cache.evictions, cache.nbytes) == (1, 1, 1, 60)
    assert cache.peek(1) is None and cache.peek(2) is not None
    assert (cache.hits, cache.misses) == (1, 1)  # peeking counts nothing


def test_a_value_of_another_version_or_no_longer_current_is_a_miss() -> None:
    cache = sized(100)
    cache.put("a", b"abc", version=("inode", 1))
    assert cache.get("a", ("inode", 1)) == b"abc"
    assert cache.get("a", ("inode", 2)) is None
    assert cache.get("a", current=lambda value: value.startswith(b"z")) is None
    assert (cache.hits, cache.misses) == (1, 2)
    assert "a" in cache  # kept until replaced or evicted


def test_unbounded_and_zero_budgets() -> None:
    unbounded = sized(None)
    for i in range(100):
        unbounded.put(str(i), b"x" * 1000)
    assert len(unbounded) == 100 and unbounded.evictions == 0
    nothing = sized(0)
    assert not nothing.put("a", b"x") and len(nothing) == 0


def test_make_room_spares_items_used_since_a_tick() -> None:
    cache = sized(30, "lru")
    for key in "abc":
        cache.put(key, b"x" * 10)
    cache.tick = 5
    cache.get("a")  # used at tick 5; b and c were never used (a put is not a use)
    assert cache.make_room(10, spare_since=4)  # b goes
    assert sorted(cache) == ["a", "c"]
    cache.get("c")
    assert not cache.make_room(20, spare_since=4)  # a and c are spared: no room
    assert sorted(cache) == ["a", "c"]
    assert cache.make_room(20)  # without sparing, the least recently used (a) goes
    assert list(cache) == ["c"]


@given(
    st.sampled_from(["lru", "mru"]),
    st.integers(0, 64),
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 40), st.booleans()), max_size=60),
)
def test_the_budget_always_holds(
    policy: str, max_bytes: int, operations: list[tuple[int, int, bool]]
) -> None:
    cache: BoundedCache[int, int] = BoundedCache(max_bytes, policy)  # type: ignore[arg-type]
    for key, size, is_get in operations:
        if is_get:
            cache.get(key)
        else:
            kept = cache.put(key, size, nbytes=size)
            assert kept == (size <= max_bytes)
            assert (key in cache) == kept
        assert cache.nbytes == sum(cache.peek(k) or 0 for k in cache) <= max_bytes


def test_threads_share_one_cache_consistently() -> None:
    cache: BoundedCache[int, int] = BoundedCache(500, "mru")

    def work(offset: int) -> None:
        for i in range(2000):
            key = (i * 7 + offset) % 50
            if cache.get(key) is None:
                cache.put(key, 10, nbytes=10)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.nbytes == 10 * len(cache) <= 500
    assert cache.hits + cache.misses == 4 * 2000
