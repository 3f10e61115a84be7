"""Deterministic bodies: the bytes of ``(size, seed)``, streamed, never built whole.

``FakeTarget`` serves them (``/bytes/<size>?seed=S``) and tests compare what
arrived with ``expected_body`` (small sizes) or ``expected_sha256`` (any size).
"""

from __future__ import annotations

import hashlib
import random
import zlib
from functools import lru_cache
from typing import Iterator

_BLOCK = 65536


@lru_cache(maxsize=64)
def _seed_block(seed: int) -> bytes:
    """Two copies of a 64 KiB pseudo-random block derived from ``seed``."""
    block = random.Random(seed).randbytes(_BLOCK)
    return block + block


def _canonical_blocks(size: int, seed: int) -> Iterator[bytes]:
    # Block i is the seed block rotated by an index-dependent amount, with the
    # index stamped into its first 8 bytes, so every offset of the body differs.
    doubled = _seed_block(seed)
    index = 0
    left = size
    while left > 0:
        rot = (index * 40503 + 7) % _BLOCK
        n = min(left, _BLOCK)
        block = index.to_bytes(8, "big") + doubled[rot + 8 : rot + _BLOCK]
        yield block if n == _BLOCK else block[:n]
        left -= n
        index += 1


def body_chunks(size: int, seed: int, chunk: int = _BLOCK) -> Iterator[bytes]:
    """Yield the deterministic body for ``(size, seed)`` in pieces of ``chunk`` bytes.

    The bytes depend only on ``size`` and ``seed`` (a smaller size gives a
    prefix of a larger one); ``chunk`` only changes how they are cut. Nothing
    larger than one 64 KiB block plus one chunk is held in memory.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    if chunk <= 0:
        raise ValueError("chunk must be > 0")
    if chunk == _BLOCK:
        yield from _canonical_blocks(size, seed)
        return
    pending = bytearray()
    for block in _canonical_blocks(size, seed):
        pending += block
        while len(pending) >= chunk:
            yield bytes(pending[:chunk])
            del pending[:chunk]
    if pending:
        yield bytes(pending)


def expected_body(size: int, seed: int) -> bytes:
    """The whole deterministic body for ``(size, seed)`` (for small sizes in tests)."""
    return b"".join(body_chunks(size, seed))


def expected_sha256(size: int, seed: int) -> str:
    """Hex sha256 of the deterministic body, computed streaming."""
    digest = hashlib.sha256()
    for piece in body_chunks(size, seed):
        digest.update(piece)
    return digest.hexdigest()


def _encoded_chunks(size: int, seed: int, encoding: str) -> Iterator[bytes]:
    if encoding == "identity":
        yield from body_chunks(size, seed)
        return
    wbits = 31 if encoding == "gzip" else 15  # gzip wrapper / zlib wrapper ("deflate")
    comp = zlib.compressobj(1, zlib.DEFLATED, wbits)
    for piece in body_chunks(size, seed):
        out = comp.compress(piece)
        if out:
            yield out
    tail = comp.flush()
    if tail:
        yield tail
