"""The streamed ``multipart/form-data`` body of upload-result and upload-logs."""

from __future__ import annotations

import io
import os
import uuid
from typing import BinaryIO, List, Optional, Tuple, Union


class MultipartBody(io.RawIOBase):
    """A ``multipart/form-data`` body streamed from files, with a known length.

    requests sends it with a Content-Length and reads it in blocks, so a
    200 MB upload never sits in memory. Each instance reads its files from
    the start: a retry builds a new one and re-sends the whole file (today's
    agent re-sent an already-read file, i.e. an empty one).
    """

    def __init__(self, parts: List[Tuple[str, str, str, Union[bytes, str]]]) -> None:
        """``parts``: (field name, file name, content type, bytes or a file path)."""
        super().__init__()
        self.boundary = uuid.uuid4().hex
        self._segments: List[Union[bytes, str]] = []
        for name, filename, ctype, content in parts:
            head = (
                f"--{self.boundary}\r\n"
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode()
            self._segments += [head, content, b"\r\n"]
        self._segments.append(f"--{self.boundary}--\r\n".encode())
        self._length = sum(
            len(s) if isinstance(s, bytes) else os.path.getsize(s) for s in self._segments
        )
        self._index = 0
        self._current: Optional[BinaryIO] = None
        self._position = 0

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        # requests' super_len() subtracts tell() from len(); without a working
        # tell() it sees length 0 and falls back to chunked transfer coding.
        return self._position

    def _next_source(self) -> Optional[BinaryIO]:
        if self._index >= len(self._segments):
            return None
        segment = self._segments[self._index]
        self._index += 1
        if isinstance(segment, bytes):
            return io.BytesIO(segment)
        return open(segment, "rb")

    def read(self, size: Optional[int] = -1) -> bytes:
        want = 1 << 62 if size is None or size < 0 else size
        out = bytearray()
        while len(out) < want:
            if self._current is None:
                self._current = self._next_source()
                if self._current is None:
                    break
            chunk = self._current.read(min(want - len(out), 1 << 20))
            if chunk:
                out += chunk
                self._position += len(chunk)
            else:
                self._current.close()
                self._current = None
        return bytes(out)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        super().close()
