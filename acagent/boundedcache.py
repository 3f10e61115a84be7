"""A bounded memo for the per-call hot paths: a dict emptied, not evicted entry
by entry, when it is full.

Each cache that uses it holds the results of a function of its key alone
(prepared target URLs, URLs the target policy allowed, AC connection pools),
so after a clear each entry costs one slow step to refill, and no hit pays
for LRU bookkeeping. Dict operations are atomic under the GIL: threads may
share a cache without a lock (at worst one computes a value twice).
"""

from __future__ import annotations

from typing import Dict, TypeVar

__all__ = ["remember"]

K = TypeVar("K")
V = TypeVar("V")


def remember(cache: Dict[K, V], key: K, value: V, limit: int) -> None:
    """Put ``key: value`` in ``cache``, emptying it first if it holds ``limit`` entries."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
