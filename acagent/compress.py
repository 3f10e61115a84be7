"""gzip of a result body for upload-result, from file to file (never whole in
memory), or of a small body held in memory."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
from typing import Callable

#: fast: every large body is compressed, and the time is an executor thread's
LEVEL = 3
#: bytes copied at a time
CHUNK = 1 << 20


def gzip_file(source: str, target: str, level: int = LEVEL) -> None:
    """Write ``source`` gzip-compressed to ``target`` (mode 0600), all or nothing.

    The data goes to ``target + ".tmp"`` first and is renamed into place, so
    a reader never sees a partial ``target``. Raises ``OSError`` (the disk is
    full, say) with no file left behind.
    """
    with open(source, "rb") as src:
        _write_gzip(target, level, lambda gz: shutil.copyfileobj(src, gz, CHUNK))


def gzip_bytes(data: bytes, target: str, level: int = LEVEL) -> None:
    """Write ``data`` gzip-compressed to ``target``, as ``gzip_file`` does (a
    small body that was kept in memory)."""
    _write_gzip(target, level, lambda gz: gz.write(data))


def _write_gzip(target: str, level: int, fill: Callable[[gzip.GzipFile], object]) -> None:
    partial = target + ".tmp"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level) as gz:
                fill(gz)
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
