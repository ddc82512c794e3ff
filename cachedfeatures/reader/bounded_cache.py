"""One byte-budgeted in-memory cache, with the eviction policy as an argument.

Every in-memory cache of the package is a :class:`BoundedCache`: the reader's decoded chunks
(``"lru"``), ``cached_module``'s memory tier (``"mru"``) and the keyed entry's decoded chunks
(``"mru"``). The policies are the ones the store's size budget uses (:mod:`cachedfeatures.pruning`),
declared here as data (:data:`POLICIES`), so adding one is adding an entry:

- ``"mru"`` evicts the most recently used item first. For the cyclic access of training
  epochs the item used last is the one needed furthest in the future, so MRU keeps a stable
  subset hitting pass after pass, where LRU would hit nothing on repeated sequential passes.
- ``"lru"`` evicts the least recently used item first: right for access with locality (a
  reader's batches of neighbouring rows), useless for repeated passes larger than the budget.

A hit (:meth:`BoundedCache.get`) makes an item the most recently used; a put makes it the
newest. An item larger than the whole budget is not kept (and evicts nothing).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, get_args

import numpy as np

from cachedfeatures.parse import parse_choice

__all__ = ["POLICIES", "BoundedCache", "Policy", "PolicySpec", "parse_policy"]

Policy = Literal["mru", "lru"]


@dataclass(frozen=True)
class PolicySpec:
    """What a policy needs: whether the most recently used item goes first."""

    most_recent_first: bool
    summary: str


# Policies as data: adding one is adding an entry here and a name to ``Policy``.
POLICIES: Mapping[Policy, PolicySpec] = {
    "mru": PolicySpec(True, "drop the most recently used first (repeated passes)"),
    "lru": PolicySpec(False, "drop the least recently used first (non-cyclic access)"),
}


def parse_policy(value: object) -> Policy:
    """``value`` if it names a policy, else a ``ValueError`` listing the valid names."""
    return parse_choice("policy", value, get_args(Policy))


def parse_max_bytes(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"Expected max_bytes to be a number of bytes (int >= 0) or None. Got {value!r}.")
    return int(value)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Item(Generic[V]):
    __slots__ = ("nbytes", "used", "value", "version")

    def __init__(self, value: V, nbytes: int, version: Hashable) -> None:
        self.value = value
        self.nbytes = nbytes
        self.version = version
        self.used = -1  # the tick of its last hit (a put is not a use)


_ANY: Any = object()  # get(): any version will do


class BoundedCache(Generic[K, V]):
    """Values by key, never more than ``max_bytes`` of them; over it, evicted by ``policy``.

    Thread-safe (one lock). Values are held as given: callers that hand them out copy them.

    Args:
        max_bytes: the most bytes held; ``None``: unbounded; ``0``: holds nothing (but
            items of size 0).
        policy: ``"lru"`` (default) or ``"mru"``: which item is evicted first (see
            :data:`POLICIES`); checked here, a wrong name is a ``ValueError`` listing them.
        nbytes: the size of a value, for :meth:`put` calls that do not give one.

    ``hits``, ``misses`` and ``evictions`` count what it did; ``tick`` is a clock the owner
    may advance (say, once per batch) so that :meth:`make_room` spares items used recently.
    """

    def __init__(
        self, max_bytes: int | None, policy: Policy = "lru", nbytes: Callable[[V], int] | None = None
    ) -> None:
        self.max_bytes = parse_max_bytes(max_bytes)
        self.policy = parse_policy(policy)
        self._most_recent_first = POLICIES[self.policy].most_recent_first
        self._size = nbytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.tick = 0
        self._items: OrderedDict[K, _Item[V]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first (a snapshot)."""
        with self._lock:
            return iter(list(self._items))

    def get(self, key: K, version: Hashable = _ANY, current: Callable[[V], bool] | None = None) -> V | None:
        """The value of ``key`` (a hit: now the most recently used), or ``None`` (a miss).

        A value held under another ``version`` than the one asked for (say, a chunk whose
        ``valid`` signature changed since it was read) is a miss, as is one for which
        ``current`` says ``False``; either stays until replaced or evicted. (``version``
        costs no call: the reader's hot path uses it.)
        """
        with self._lock:
            item = self._items.get(key)
            if (
                item is None
                or (version is not _ANY and item.version != version)
                or (current is not None and not current(item.value))
            ):
                self.misses += 1
                return None
            self._items.move_to_end(key)
            item.used = self.tick
            self.hits += 1
            return item.value

    def peek(self, key: K) -> V | None:
        """The value of ``key`` or ``None``, counting nothing and leaving the order as it is."""
        item = self._items.get(key)
        return None if item is None else item.value

    def put(self, key: K, value: V, nbytes: int | None = None, version: Hashable = None) -> bool:
        """Keep ``value`` under ``key`` (replacing what it held), as of ``version``, evicting
        by the policy to make room; ``False`` if it cannot fit at all (then it is not kept and
        nothing is evicted)."""
        if nbytes is None:
            if self._size is None:
                raise TypeError("Expected nbytes: this cache was made without a size function.")
            nbytes = self._size(value)
        with self._lock:
            self._remove(key)
            if self._never_fits(nbytes, value):
                return False
            while self._items and self._over(nbytes, value):
                self._evict()
            self._items[key] = _Item(value, nbytes, version)
            self.nbytes += nbytes
            self._added(value)
            return True

    def make_room(self, nbytes: int, spare_since: int | None = None) -> bool:
        """Evict by the policy until ``nbytes`` more would fit; whether they fit now.

        With ``spare_since``, stop at the first item the policy would evict whose last hit
        was at a ``tick`` of ``spare_since`` or later: those are never pushed out.
        """
        with self._lock:
            while self._items and self.max_bytes is not None and self.nbytes + nbytes > self.max_bytes:
                if spare_since is not None and self._items[self._victim()].used >= spare_since:
                    return False
                self._evict()
            return self.max_bytes is None or self.nbytes + nbytes <= self.max_bytes

    def discard(self, key: K) -> None:
        with self._lock:
            self._remove(key)

    def clear(self) -> None:
        with self._lock:
            for item in self._items.values():
                self._removed(item.value)
            self._items.clear()
            self.nbytes = 0

    # -- for subclasses with a second budget (called under the lock) ----------------------------

    def _never_fits(self, nbytes: int, value: V) -> bool:
        return self.max_bytes is not None and nbytes > self.max_bytes

    def _over(self, nbytes: int, value: V) -> bool:
        return self.max_bytes is not None and self.nbytes + nbytes > self.max_bytes

    def _added(self, value: V) -> None:
        """Called when ``value`` is kept."""

    def _removed(self, value: V) -> None:
        """Called when ``value`` leaves (replaced, discarded, evicted or cleared)."""

    # -- internals -------------------------------------------------------------------------------

    def _victim(self) -> K:
        return next(reversed(self._items)) if self._most_recent_first else next(iter(self._items))

    def _evict(self) -> None:
        self._remove(self._victim())
        self.evictions += 1

    def _remove(self, key: K) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item.nbytes
            self._removed(item.value)
