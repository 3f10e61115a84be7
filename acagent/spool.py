"""The durable result spool: results waiting for the AC server, kept on disk.

The executor streams each target response body into the spool (``open_body``),
so a body is never held whole in memory. Before a result is uploaded, its record
(the result JSON, a plain dict) is written durably with ``save``; only when the
AC server has accepted the result does the caller ``remove`` it. Whatever is
still in the spool after a crash or a failed upload is found again by
``pending`` and re-sent.

On-disk layout (one flat folder, mode 0700, every file mode 0600)::

    <key>.json          the saved record of a result (written atomically; a small
                        body may be inside it, ``save(has_body=False)``); while
                        a task runs, its journal: the error result that answers it
                        if the agent dies first (``journal``), replaced by the result
    <key>.body          the streamed response body of that result (optional)
    <key>.body.gz       its gzip copy for upload-result, made by the executor (derived)
    <key>.body.gz.tmp   a gzip copy being written; a leftover one is a crash's debris
    <key>.json.tmp      a record being written; a leftover one is a crash's debris
    <key>.json.corrupt  a record that did not parse, moved aside (``recover`` answers
                        it when its taskId can still be read, then quarantines it)

``<key>`` is a uuid4 hex string made by the caller (32 lowercase hex digits);
any other name in the folder is never read, changed or removed by the spool.

**Where a record belongs and what it holds.** Once ``set_origin`` was called,
every record and journal carries, under its ``"spool"`` field, the AC server
it was taken from and a digest of the API key (``Origin``; never the key), and
a record whose body was streamed through ``open_body`` the sha256 of that
body. ``recover`` sorts the records at start: this origin's are delivered;
another origin's are left in place, untouched, for the agent they belong to;
a record without an origin (written before origins were recorded) is adopted
and stamped with this origin, since the agent that wrote it would have sent
it to whichever server it was next started for, and set aside it would have
no agent to deliver it. ``check_body`` tells whether a body file is still the
one saved: its length, and its sha256 where one was recorded.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    BinaryIO,
    Callable,
    Deque,
    Dict,
    Final,
    Iterator,
    List,
    Optional,
    Set,
    Tuple,
    Union,
    cast,
)

from .config import safe_url
from .errors import SpoolLockedError
from .folders import O_NOFOLLOW

__all__ = [
    "QUARANTINE_DIR",
    "SPOOL_ERRNOS",
    "SPOOL_FIELD",
    "Origin",
    "Record",
    "Recovery",
    "ResultSpool",
    "SpoolSurvey",
    "body_mismatch",
    "origin_verdict",
    "read_head",
    "spool_error_reason",
    "survey_spool",
    "task_id_in_record",
    "task_id_in_text",
    "tasks_that_fit",
]

log = logging.getLogger("acagent.spool")

Record = Dict[str, Any]
"""A result record as the spool stores it: any JSON-serialisable dict."""

_RECORD: Final = ".json"
_BODY: Final = ".body"
_GZ: Final = ".body.gz"
_GZ_TMP: Final = ".body.gz.tmp"
_TMP: Final = ".json.tmp"
_CORRUPT: Final = ".json.corrupt"

#: sub-folder for results the AC server refused for good (kept for a human)
QUARANTINE_DIR: Final = "quarantine"
#: the files ``quarantine`` moves, and their names in ``quarantine/<key>/``
_QUARANTINED: Final = ((_RECORD, "record.json"), (_CORRUPT, "record.json.corrupt"), (_BODY, "body"))
#: the lock file that keeps a second agent off the folder
LOCK_FILE: Final = ".lock"

_KEY_RE: Final = re.compile(r"[0-9a-f]{32}")
_NAME_RE: Final = re.compile(
    r"([0-9a-f]{32})(\.json|\.body|\.body\.gz|\.body\.gz\.tmp|\.json\.tmp|\.json\.corrupt)"
)

# Flags that exist only on some platforms; 0 where they do not.
_O_BINARY: Final = getattr(os, "O_BINARY", 0)
_O_DIRECTORY: Final = getattr(os, "O_DIRECTORY", 0)

# errno values meaning "this file system cannot fsync a directory": not an error.
_FSYNC_UNSUPPORTED: Final = frozenset(
    code
    for code in (getattr(errno, name, None) for name in ("EINVAL", "ENOTSUP", "EOPNOTSUPP"))
    if code is not None
)


#: errno values that mean "the spool cannot take data now" (as opposed to a bug)
SPOOL_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM})


def spool_error_reason(exc: OSError) -> str:
    """A short, operator-facing reason for a spool write failure."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left in the spool folder"
    if exc.errno == errno.EROFS:
        return "the spool folder is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "no permission to write the spool folder"
    return f"cannot write the spool folder ({exc.strerror or type(exc).__name__})"


# ---------------------------------------------------------------------------- origins

#: the record field the spool keeps for itself: origin and body checksum
SPOOL_FIELD: Final = "spool"
#: mixed into the API key's digest, so the digest names the key for this use only
_KEY_DIGEST_SALT: Final = b"acagent spool origin v1\x00"
#: the origin as ``_encode`` writes it (compact JSON, keys in this order);
#: what ``_origin_in_text`` finds in a record that no longer parses
_ORIGIN_RE: Final = re.compile(
    r'"spool":\{"server":("(?:[^"\\]|\\.)*"),"keyDigest":("(?:[^"\\]|\\.)*")'
)
_TASK_ID_RE: Final = re.compile(r'"taskId"\s*:\s*("(?:[^"\\]|\\.)*"|-?[0-9]+)')


@dataclass(frozen=True)
class Origin:
    """Where a result belongs: the AC server it was taken from and which API key.

    ``key_digest`` is a salted, truncated sha256 of the key: it tells two keys
    apart and can be logged; the key cannot be had back from it.
    """

    server: str
    key_digest: str

    @classmethod
    def of(cls, server_url: str, api_key: str) -> Origin:
        """The origin of an agent: its server URL normalised (no trailing slash,
        userinfo, query, fragment or default port; host in lower case) and its
        key's digest."""
        digest = hashlib.sha256(_KEY_DIGEST_SALT + api_key.encode("utf-8")).hexdigest()
        server = safe_url(server_url.rstrip("/")).rstrip("/")
        scheme, _, rest = server.partition("://")
        host, slash, path = rest.partition("/")
        default_port = {"https": ":443", "http": ":80"}.get(scheme)
        if default_port and host.endswith(default_port):
            server = f"{scheme}://{host[: -len(default_port)]}{slash}{path}"
        return cls(server, "sha256:" + digest[:16])

    def __str__(self) -> str:
        return f"{self.server} (key {self.key_digest})"


#: ``origin_verdict`` answers: which agent a record belongs to
MINE: Final = "mine"
UNMARKED: Final = "unmarked"
OTHER: Final = "other"


def origin_verdict(found: Optional[Origin], marked: bool, ours: Optional[Origin]) -> str:
    """Whose record this is: ``MINE``, ``UNMARKED`` (written before origins were
    recorded: adopted) or ``OTHER`` (another server or key, or an origin that
    cannot be read: left for its agent).

    ``found``: the origin the record names; ``marked``: whether it carries
    the spool's field at all; ``ours``: this agent's origin (None: a spool
    used without origins, which takes every record)."""
    if ours is None:
        return MINE
    if not marked:
        return UNMARKED
    return MINE if found == ours else OTHER


def task_id_in_text(text: str) -> Optional[str]:
    """The first ``taskId`` value in a record's raw text, or None: how a record
    that no longer parses is still answered."""
    match = _TASK_ID_RE.search(text)
    if match is None:
        return None
    try:
        return _usable_id(json.loads(match.group(1)))
    except ValueError:
        return None


def task_id_in_record(record: Record) -> Optional[str]:
    """The ``taskId`` of a record that parses but is not a result any more
    (fields missing or of the wrong type), or None."""
    fields = record.get("fields")
    return _usable_id(fields.get("taskId")) if isinstance(fields, dict) else None


def _usable_id(value: Any) -> Optional[str]:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return None
    text = str(value)
    return text if text.strip() else None


def _origin_of_field(own: Any) -> Tuple[Optional[Origin], bool]:
    """``(origin, marked)`` of a parsed record's ``SPOOL_FIELD`` value (see
    ``origin_verdict``); a field without origin keys (a body checksum
    alone) is unmarked."""
    if not isinstance(own, dict):
        return None, own is not None
    server, digest = own.get("server"), own.get("keyDigest")
    if server is None and digest is None:
        return None, False
    if isinstance(server, str) and isinstance(digest, str):
        return Origin(server, digest), True
    return None, True


def _origin_in_text(text: str) -> Tuple[Optional[Origin], bool]:
    """``(origin, marked)`` of a record's raw text that does not parse."""
    match = _ORIGIN_RE.search(text)
    if match is None:
        return None, '"keyDigest"' in text
    try:
        return Origin(json.loads(match.group(1)), json.loads(match.group(2))), True
    except ValueError:
        return None, True


@dataclass
class Recovery:
    """What ``ResultSpool.recover`` found at start."""

    #: records to deliver, oldest first: this origin's, and the unmarked ones adopted
    records: List[Tuple[str, Record]] = field(default_factory=list)
    #: how many records had no origin (adopted, now stamped with this origin)
    adopted: int = 0
    #: records of another origin, left in place: origin (or "unreadable") -> count
    aside: Dict[str, int] = field(default_factory=dict)
    #: this origin's records that did not parse: ``(key, taskId read from the text)``
    damaged: List[Tuple[str, Optional[str]]] = field(default_factory=list)


@dataclass
class SpoolSurvey:
    """What a spool folder holds, read without changing anything (``survey_spool``)."""

    mine: int = 0
    unmarked: int = 0
    aside: Dict[str, int] = field(default_factory=dict)
    damaged: int = 0
    quarantined: int = 0


def _count(counts: Dict[str, int], origin: Optional[Origin]) -> None:
    name = str(origin) if origin is not None else "an unreadable origin"
    counts[name] = counts.get(name, 0) + 1


def survey_spool(directory: Union[str, Path], origin: Origin) -> SpoolSurvey:
    """Count the records of ``directory`` by whose they are, for ``acagent check``.

    Read only: no file is moved, no folder made, no lock taken (a running
    agent may hold it). A folder that does not exist holds nothing.
    """
    survey = SpoolSurvey()
    folder = Path(directory)
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return survey
    for name in names:
        match = _NAME_RE.fullmatch(name)
        if match is None or match.group(2) not in (_RECORD, _CORRUPT):
            continue
        try:
            raw = _read_file(folder / name)
        except OSError:
            continue
        record = _parse(raw) if match.group(2) == _RECORD else None
        if record is not None:
            found, marked = _origin_of_field(record.get(SPOOL_FIELD))
        else:
            found, marked = _origin_in_text(raw.decode("utf-8", "replace"))
        verdict = origin_verdict(found, marked, origin)
        if verdict == OTHER:
            _count(survey.aside, found)
        elif record is None:
            survey.damaged += 1
        elif verdict == UNMARKED:
            survey.unmarked += 1
        else:
            survey.mine += 1
    with contextlib.suppress(FileNotFoundError):
        survey.quarantined = sum(
            1 for e in os.scandir(folder / QUARANTINE_DIR) if _KEY_RE.fullmatch(e.name)
        )
    return survey


def _parse(raw: bytes) -> Optional[Record]:
    """A record's bytes as a dict, or None if they are not a JSON object."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------------------- files

_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY | O_NOFOLLOW
#: a symbolic link in the place of a spool file is refused (ELOOP), never followed
_READ_FLAGS: Final = os.O_RDONLY | _O_BINARY | O_NOFOLLOW
#: bytes read at a time from a file of unknown size (a body being hashed)
_CHUNK: Final = 256 * 1024


def _create_private(path: Union[str, Path]) -> int:
    """Create ``path`` for writing, a raw file descriptor: it must not exist
    (nor be a symlink); mode 0600."""
    return os.open(path, _CREATE_FLAGS, 0o600)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a short write is retried)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _open_read(path: Union[str, Path]) -> int:
    """Open ``path`` for reading, a raw file descriptor: every read of a spool
    file (record, body) opens it here."""
    return os.open(path, _READ_FLAGS)


def _read_fd(fd: int, limit: Optional[int] = None) -> bytes:
    """Up to ``limit`` bytes (None: all) from ``fd``'s position."""
    parts: List[bytes] = []
    left = limit
    while left is None or left > 0:
        part = os.read(fd, _CHUNK if left is None else left)
        if not part:
            break
        parts.append(part)
        if left is not None:
            left -= len(part)
    return b"".join(parts)


def _read_file(path: Union[str, Path]) -> bytes:
    fd = _open_read(path)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def read_head(path: Union[str, Path], limit: int) -> bytes:
    """Up to ``limit`` bytes from the start of ``path``, with raw descriptor calls.

    ``open()`` would add an fstat, an ioctl and an lseek: under load each
    system call is a release and re-take of the GIL. Raises
    ``FileNotFoundError`` when the file is gone.
    """
    fd = _open_read(path)
    try:
        return _read_fd(fd, limit)
    finally:
        os.close(fd)


#: the body size the headroom rule assumes until a larger body was seen
MIN_BODY_BOUND: Final = 1024 * 1024
#: how many of the latest bodies the headroom rule takes the largest of
RECENT_BODIES: Final = 64


def tasks_that_fit(free: int, largest_body: int, max_body: int) -> int:
    """How many tasks' bodies ``free`` bytes of spool hold.

    Each task may write a body as large as the largest seen lately (at least
    ``MIN_BODY_BOUND``, never more than ``max_body``, ``--maxResponseBytes``,
    when set: a limit says what cannot come, the bodies seen what does), and
    a gzip copy of it for upload-result, which for data that does not
    compress is as large again.
    """
    bound = max(largest_body, MIN_BODY_BOUND)
    if max_body > 0:
        bound = min(bound, max_body)
    return free // (2 * bound)


def body_mismatch(
    size: int, sha256: Optional[str], got_size: int, got_sha256: Optional[str]
) -> Optional[str]:
    """Why a body is not the one its record describes (``size``, ``sha256`` if
    recorded), or None if it is."""
    if got_size != size:
        return f"the body file holds {got_size} bytes, its record says {size}"
    if sha256 is not None and got_sha256 is not None and got_sha256 != sha256:
        return "the body file does not match the sha256 in its record"
    return None


class BodyFile(io.RawIOBase):
    """A body being streamed into the spool (``ResultSpool.open_body``).

    Unbuffered, on a raw descriptor: every ``write`` writes all its bytes
    with ``os.write``, and ``close`` fsyncs the file before closing it, so
    ``save`` need not open it again to sync it. A buffered file object would
    cost an ``ioctl``, an ``lseek`` and an ``fstat`` more per body, each a
    release and re-take of the GIL under load.

    Each write also feeds a sha256 of the body (hashlib lets go of the GIL
    for a chunk this size), which ``save`` puts in the record for
    ``check_body``. ``on_closed(sha256, size)`` runs once the file is synced;
    ``on_failed(exc, size)`` when a write fails.
    """

    def __init__(
        self,
        fd: int,
        on_closed: Callable[[str, int], None],
        on_failed: Callable[[OSError, int], None],
    ) -> None:
        super().__init__()
        self._fd = fd
        self._on_closed = on_closed
        self._on_failed = on_failed
        self._sha256 = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed body file")
        data = bytes(data) if not isinstance(data, bytes) else data
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self._on_failed(exc, self._size + len(data))
            raise
        self._sha256.update(data)
        self._size += len(data)
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            os.fsync(self._fd)
            self._on_closed(self._sha256.hexdigest(), self._size)
        except OSError as exc:
            self._on_failed(exc, self._size)
            raise
        finally:
            os.close(self._fd)
            super().close()


class _KeyState:
    """What the spool knows of one key, besides its files: one value per key,
    changed only with the spool's lock held (``ResultSpool._change``)."""

    __slots__ = (
        "aside",
        "bodiless",
        "body_sha256",
        "journal",
        "leaving",
        "live_body",
        "record",
        "reported",
        "synced_body",
    )

    def __init__(self) -> None:
        #: ``<key>.json`` is on disk
        self.record = False
        #: ... and is a task journal (``journal``), not yet a result
        self.journal = False
        #: ... and belongs to another origin (``recover``): never delivered nor removed
        self.aside = False
        #: the server has the result; ``remove`` has not unlinked its files yet
        self.leaving = False
        #: this instance is writing the body and no record names it yet:
        #: ``clean_orphans`` must not take it
        self.live_body = False
        #: a ``BodyFile`` fsynced the body as it closed (``save`` skips that)
        self.synced_body = False
        #: saved with ``has_body=False``, no body opened since: ``remove`` has
        #: no body file to unlink
        self.bodiless = False
        #: sha256 of the body a ``BodyFile`` wrote (or a record found at start
        #: named), until the record goes: ``save`` records it, ``check_body``
        #: checks against it
        self.body_sha256: Optional[str] = None
        #: the record was reported as unreadable already (logged once)
        self.reported = False

    @property
    def counted(self) -> bool:
        """Counted by ``ResultSpool.size``: a saved result of this agent not yet delivered."""
        return self.record and not (self.journal or self.aside or self.leaving)

    @property
    def empty(self) -> bool:
        """Nothing worth keeping: the same as a key the spool never saw."""
        return not any(getattr(self, name) for name in self.__slots__)


class ResultSpool:
    """A folder of results not yet accepted by the AC server.

    Thread-safe: any thread may call any method. Each key has one owner at a
    time (the thread handling that task); the spool does not arbitrate between
    two threads writing the body of the same key.
    """

    DELIVERY_GUARANTEE: Final[str] = "at-least-once"
    """The delivery guarantee the spool gives, and why: at least once.

    The record is durable (fsynced file and directory) before the upload
    starts and is removed only after the server accepted it, so a crash
    before the acceptance loses nothing. A result can reach the server twice,
    with identical content: when a crash falls between the server's
    acceptance and the end of ``remove`` (the next start re-sends it), and
    when the reply to an upload is lost (a connection reset after the request
    went out): the client re-sends once at once, and counts it
    (``ac_requests_total{status="resend"}``). Nothing is ever dropped silently.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._dir = Path(directory)
        self._dir_name = str(self._dir)
        # Parents get the default permissions; the spool folder itself is private.
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # mkdir's mode is filtered by the umask, and an old folder keeps its
            # mode: set it explicitly either way.
            os.chmod(self._dir, 0o700)
        except OSError as exc:
            log.warning("cannot make the spool folder %s private (mode 0700): %s", self._dir, exc)
        self._lock = threading.Lock()
        # One state per key (see the invariant in ``save``), and how many of
        # them ``size`` counts: both changed only with the lock held, by
        # ``_change``; keys the spool knows nothing of have no entry.
        self._states: Dict[str, _KeyState] = {}
        self._size = 0
        with self._lock:
            for key in self._scan(_RECORD):
                self._change(key, record=True)
        # This agent's origin as ``_encode`` writes it (``set_origin``).
        self._origin: Optional[Origin] = None
        self._origin_field: Dict[str, str] = {}
        # What the ledger asks while the disk is short (``take_space_failure``,
        # ``largest_body``): set by body writes on any thread (an attribute
        # swap and a bounded deque's append are atomic, and max() over ints
        # never lets go of the GIL midway).
        self._space_failure: Optional[str] = None
        self._recent_bodies: Deque[int] = collections.deque(maxlen=RECENT_BODIES)
        #: the largest body a task may write (``--maxResponseBytes``; 0: no limit)
        self.max_body = 0
        self._lock_fd: Optional[int] = None
        # Group commit of folder fsyncs (see save): renames done, renames synced.
        self._sync_cond = threading.Condition()
        self._renamed = 0
        self._synced = 0
        self._syncing = False

    def __repr__(self) -> str:
        with self._lock:
            records = sum(state.record for state in self._states.values())
        return f"ResultSpool({str(self._dir)!r}, records={records})"

    # ------------------------------------------------------------------ paths

    @property
    def directory(self) -> Path:
        """The spool folder."""
        return self._dir

    def body_path(self, key: str) -> Path:
        """Where the body for ``key`` is (or will be) written: ``<key>.body``."""
        return self._path(key, _BODY)

    def compressed_path(self, key: str) -> Path:
        """Where a gzip copy of the body may be kept for upload-result: ``<key>.body.gz``.

        Derived data: it is not synced, and a missing or partial one is made
        again from the body. Removed with the body.
        """
        return self._path(key, _GZ)

    def record_path(self, key: str) -> Path:
        """Where the record for ``key`` is saved: ``<key>.json``."""
        return self._path(key, _RECORD)

    def has_body(self, key: str) -> bool:
        """Whether the body file for ``key`` exists."""
        return self.body_path(key).is_file()

    # ------------------------------------------------------------------ origin

    def set_origin(self, origin: Origin) -> None:
        """Stamp every record and journal written from now on with ``origin``;
        ``recover`` sorts the records found by it. Call before any task runs."""
        self._origin = origin
        self._origin_field = {"server": origin.server, "keyDigest": origin.key_digest}

    @property
    def origin(self) -> Optional[Origin]:
        return self._origin

    # ------------------------------------------------------------------ writing

    def open_body(self, key: str) -> BinaryIO:
        """Create ``<key>.body`` (mode 0600, must not exist yet) for streaming writes.

        Raises ``FileExistsError`` if the body exists. The caller closes the
        file; closing fsyncs it (``BodyFile``), and ``save`` syncs a body
        that was not closed that way.
        """
        path = self._name(key, _BODY)
        # Mark the body live before it exists, so a concurrent clean_orphans
        # never sees it as an orphan.
        with self._lock:
            self._change(key, live_body=True, synced_body=False, bodiless=False, body_sha256=None)
        try:
            fd = _create_private(path)
        except BaseException as exc:
            with self._lock:
                self._change(key, live_body=False)
            if isinstance(exc, OSError):
                self._note_body_failure(exc, 0)
            raise

        def closed(sha256: str, size: int) -> None:
            with self._lock:
                self._change(key, body_sha256=sha256, synced_body=True)
            self._recent_bodies.append(size)

        return cast(BinaryIO, BodyFile(fd, closed, self._note_body_failure))

    def _note_body_failure(self, exc: OSError, size: int) -> None:
        """A body write failed at ``size`` bytes: the body was at least that
        large; a full disk is told to the ledger (``take_space_failure``)."""
        self._recent_bodies.append(size)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self._space_failure = spool_error_reason(exc) + f": {self._dir}"

    def save(self, key: str, record: Record, *, has_body: bool = True) -> None:
        """Write the record for ``key`` durably and atomically (replacing any older one).

        The record goes to ``<key>.json.tmp`` (0600), is flushed and fsynced,
        then renamed over ``<key>.json`` and the folder is fsynced. If the body
        file exists it is fsynced first, so a saved record never names a body
        that is not on disk. A failure at any point leaves the previous record
        (if any) intact and no partial ``<key>.json``.

        ``has_body=False`` says the caller made no body file for ``key`` (the
        record holds all there is, e.g. a small body in base64): no body is
        looked for, and ``remove`` unlinks none, unless ``open_body`` is
        called for the key later. Each skipped system call is a GIL hand-off
        saved under load.

        Group commit: the files are written and synced outside the folder
        lock (each key has one writer), and one folder fsync serves every
        rename done before it started: threads saving at the same moment
        share it (``_sync_folder``). The body's directory entry needs no fsync
        of its own: it was made before the rename, in the same folder, and a
        journaling file system commits a folder's entries in order, so the
        folder fsync after the rename makes both durable. ``save`` returns
        only once its record is durable.
        """
        # The body's checksum is written by the key's owner alone (this thread):
        # a plain read (the dict lookup and the attribute read are atomic).
        known = self._states.get(self._check_key(key))
        data = self._encode(key, record, known.body_sha256 if has_body and known else None)
        # The body and the tmp file have one writer (the key's owner), so they
        # are written and synced outside the lock. A body closed through
        # open_body's BodyFile was synced as it was closed.
        with self._lock:
            state = self._states.get(key)
            sync_body = has_body and not (state is not None and state.synced_body)
            if not has_body:
                if not (state is not None and state.live_body):  # a body being written
                    self._change(key, bodiless=True)  # still needs removing
            elif not sync_body:
                self._change(key, synced_body=False)  # it only bridges close -> save
        if sync_body:
            self._fsync_file(self._name(key, _BODY))
        tmp = self._name(key, _TMP)
        self._write_new(tmp, data)
        with self._lock:
            # Locking invariant: records are renamed into place and unlinked,
            # and the keys' states changed, only with the lock held (size()
            # reads one counter lock-free: a single atomic read). So whenever
            # the lock is free, the states with ``record`` are exactly the
            # keys whose <key>.json is on disk (a record found corrupt leaves
            # it at the next pending()), and ``_size`` counts them as
            # ``_KeyState.counted`` says. A <key>.json.tmp is written only by
            # its key's owner; at start (clean_orphans, before any task runs)
            # any that exists is a crash's debris.
            self._rename_into_place(tmp, key)
            # the record now protects the body
            self._change(key, journal=False, live_body=False)
            mine = self._note_rename()
        self._sync_folder(mine)

    def journal(self, key: str, record: Record) -> None:
        """Note a task that is about to run: ``record`` becomes ``<key>.json``.

        ``record`` is the answer for the task if the agent dies before its
        result is saved (an error result): after a ``kill -9`` the next start
        finds it with ``pending`` and delivers it, so the AC server hears of
        every task the agent took. ``save`` for the same key replaces it.
        Atomic (tmp file and rename) but not fsynced: it survives the death
        of the process, not of the machine, and costs no disk flush per task.
        The task's credentials and body are never in it (``to_record``).
        """
        data = self._encode(key, record)
        tmp = self._name(key, _TMP)
        self._write_new(tmp, data, sync=False)
        with self._lock:  # invariant: see save()
            self._rename_into_place(tmp, key)
            self._change(key, journal=True)

    def _encode(self, key: str, record: Record, body_sha256: Optional[str] = None) -> bytes:
        """Check ``key`` and serialise ``record`` before anything touches the
        disk: a bad key or an unserialisable record changes nothing. The
        spool's own field (origin, body checksum) goes in as ``SPOOL_FIELD``,
        origin first (``_ORIGIN_RE`` reads it so from a damaged record)."""
        self._check_key(key)
        if not isinstance(record, dict):
            raise TypeError(f"a spool record must be a dict, not {type(record).__name__}")
        if self._origin_field or body_sha256 is not None:
            own: Dict[str, str] = dict(self._origin_field)
            if body_sha256 is not None:
                own["bodySha256"] = body_sha256
            record = {**record, SPOOL_FIELD: own}
        return json.dumps(record, separators=(",", ":")).encode("ascii")

    def _rename_into_place(self, tmp: str, key: str) -> None:
        """Rename ``tmp`` over ``<key>.json`` (lock held); on failure the tmp file goes."""
        try:
            os.replace(tmp, self._name(key, _RECORD))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._change(key, record=True)

    def delivered(self, key: str) -> None:
        """The server has the result of ``key``: it leaves ``size`` now, its
        files later (``remove``, on another thread). No disk."""
        with self._lock:
            state = self._states.get(key)
            if state is not None and state.record:
                self._change(key, leaving=True)

    def remove(self, key: str) -> None:
        """Remove the record and then the body of ``key``; missing files are fine.

        (A key saved with ``has_body=False`` has no body file to unlink.)

        The record goes first: a crash in between leaves an orphan body, which
        ``clean_orphans`` removes, never a record without its body.

        The unlinks are not followed by a folder fsync: the next ``save``'s
        folder fsync makes them durable (it syncs every entry of the folder).
        A power cut before that brings the record back and the result is sent
        again, identical, which the at-least-once guarantee already allows (a
        crash between the server's acceptance and this call does the same).
        So no caller waits for the disk here, behind other threads' fsyncs.
        """
        record = self._name(key, _RECORD)
        with self._lock:  # invariant: see save()
            self._unlink(record)
            state = self._states.get(key)
            if not (state is not None and state.bodiless):  # saved without a body file
                self._unlink(self._name(key, _BODY))
                self._unlink(self._name(key, _GZ))
            self._forget(key)

    def discard_body(self, key: str) -> None:
        """Remove only the body file of ``key`` (e.g. once it went inline); missing is fine."""
        body = self._name(key, _BODY)
        with self._lock:  # invariant: see save()
            removed = self._unlink(body)
            removed = self._unlink(self._name(key, _GZ)) or removed
            self._change(key, live_body=False, synced_body=False, body_sha256=None)
            mine = self._note_rename() if removed else 0
        if removed:
            self._sync_folder(mine)

    def probe_writable(self) -> bool:
        """Whether a small file can be written and synced in the folder now.

        Used while the spool is known to be full or read-only, to notice by
        itself when it can take results again.
        """
        probe = self._dir / ".probe.tmp"
        try:
            self._write_new(probe, b"0" * 4096)
        except OSError:
            return False
        with contextlib.suppress(OSError):
            os.unlink(probe)
        return True

    def free_bytes(self) -> Optional[int]:
        """Bytes the folder's file system has free for this process now
        (``os.statvfs``), or None where that cannot be known."""
        try:
            stats = os.statvfs(self._dir)
        except (AttributeError, OSError):  # no statvfs on Windows
            return None
        return stats.f_bavail * stats.f_frsize

    def take_space_failure(self) -> Optional[str]:
        """Why a body write ran out of space since the last call (then
        forgotten), or None. Cheap: no disk access."""
        failure, self._space_failure = self._space_failure, None
        return failure

    @property
    def largest_body(self) -> int:
        """The largest of the last ``RECENT_BODIES`` bodies written (or begun)
        through ``open_body``: one huge body does not shape the rest of the run."""
        return max(self._recent_bodies, default=0)

    def tasks_with_room(self) -> Optional[int]:
        """How many tasks' bodies the folder's file system has room for now
        (``tasks_that_fit``); None where free space cannot be known."""
        free = self.free_bytes()
        return None if free is None else tasks_that_fit(free, self.largest_body, self.max_body)

    def quarantine(self, key: str, reason: str, *, body: Optional[bytes] = None) -> Optional[Path]:
        """Move the record and body of ``key`` into ``quarantine/`` with a reason file.

        For a result the AC server refused for good (400/422), a body that is
        not the one saved, a record that is damaged (``<key>.json.corrupt``
        goes too): the content is never silently deleted; an operator finds
        it there (listed at start).
        ``body``: the bytes of a body the record holds itself (it has no body
        file); they are written out as ``body`` too, for the human. Returns
        the folder it went to, or None if nothing was on disk.
        """
        target = self._dir / QUARANTINE_DIR / self._check_key(key)
        moved = False
        with self._lock:  # invariant: see save()
            for suffix, name in _QUARANTINED:
                source = self._path(key, suffix)
                if not source.exists():
                    continue
                target.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.replace(source, target / name)
                moved = True
            self._forget(key)
        if not moved:
            return None
        if body is not None and not (target / "body").exists():
            self._write_new(target / "body", body)
        self._write_new(target / "reason.txt", reason.encode("utf-8", "replace"))
        self._fsync_dir()
        return target

    def quarantined(self) -> List[str]:
        """Keys of the results kept in ``quarantine/`` (for the start-up listing)."""
        folder = self._dir / QUARANTINE_DIR
        try:
            return sorted(e.name for e in os.scandir(folder) if _KEY_RE.fullmatch(e.name))
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ the folder lock
    def lock(self) -> None:
        """Take an exclusive lock on the folder for this process (one agent per spool).

        Raises ``SpoolLockedError`` naming the holder's pid if another process
        has it. The lock lives as long as the open file: ``unlock`` or the
        process's end releases it (also after kill -9).
        """
        if self._lock_fd is not None:
            return
        path = self._dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolLockedError(str(self._dir), holder) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._lock_fd = fd

    def unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def pending(self) -> List[Tuple[str, Record]]:
        """All saved records as ``(key, record)``, oldest first (by mtime, then key).

        A record that does not parse as a JSON object is skipped, logged once
        and moved aside to ``<key>.json.corrupt``. A record whose body file is
        missing is still returned: the spool does not know which field of a
        record refers to the body, so the caller decides (``has_body``), e.g.
        answering the task with an ``Agent Side Error``. Records are returned
        as they were saved, without the spool's own field; those of every
        origin are listed (``recover`` sorts them).

        Every record is loaded into memory; records are small (no body is
        ever in one: bodies stay on disk). Meant for the start: the
        journal of a task left by an earlier run is one of the records (its
        answer); called while tasks run, it would list their journals too.
        """
        return [(key, record) for key, record, _ in self._pending()]

    def _pending(self) -> List[Tuple[str, Record, Any]]:
        """``pending``, each record with the spool's own field taken out of it."""
        found: List[Tuple[int, str, Record, Any]] = []
        with self._lock:  # invariant: see save()
            keys: Set[str] = set()
            for key in self._scan(_RECORD):
                loaded = self._load(key)
                if loaded is None:
                    continue
                mtime_ns, record = loaded
                own = record.pop(SPOOL_FIELD, None)
                sha256 = own.get("bodySha256") if isinstance(own, dict) else None
                if isinstance(sha256, str):
                    self._change(key, body_sha256=sha256)
                found.append((mtime_ns, key, record, own))
                keys.add(key)
            # Only the records loaded are the spool's records now.
            for key in [key for key in self._states if key not in keys]:
                self._change(key, record=False, journal=False, aside=False, leaving=False)
            for key in keys:
                self._change(key, record=True)
        found.sort(key=lambda item: (item[0], item[1]))
        return [(key, record, own) for _, key, record, own in found]

    def recover(self) -> Recovery:
        """Sort what an earlier run left, at start (after ``set_origin``, before
        any task runs); see the module doc for the rule.

        This origin's records are returned to be delivered. A record of no
        origin is adopted: saved again, stamped with this origin (if the disk
        cannot take it now, it is still returned). A record of another origin
        is left as it is and counted in ``aside``; ``size`` does not count it.
        A record that does not parse is moved to ``<key>.json.corrupt`` (see
        ``pending``) and listed in ``damaged`` with the taskId its text still
        shows, unless the text names another origin.
        """
        found = Recovery()
        aside: Set[str] = set()
        for key, record, own in self._pending():
            origin, marked = _origin_of_field(own)
            verdict = origin_verdict(origin, marked, self._origin)
            if verdict == OTHER:
                aside.add(key)
                _count(found.aside, origin)
                continue
            if verdict == UNMARKED:
                found.adopted += 1
                try:
                    self.save(key, record)
                except OSError as exc:
                    log.warning("spool: could not stamp record %s with its origin: %s", key, exc)
            found.records.append((key, record))
        with self._lock:
            for key in list(self._states):
                self._change(key, aside=key in aside)
        for key in self._scan(_CORRUPT):
            try:
                text = _read_file(self._name(key, _CORRUPT)).decode("utf-8", "replace")
            except OSError:
                continue
            origin, marked = _origin_in_text(text)
            if origin_verdict(origin, marked, self._origin) == OTHER:
                _count(found.aside, origin)
            else:
                found.damaged.append((key, task_id_in_text(text)))
        return found

    def check_body(
        self, key: str, path: Union[str, Path], size: int, data: Optional[bytes] = None
    ) -> Optional[str]:
        """Why the body of ``key`` at ``path`` is not the one saved, or None.

        The length is checked against ``size`` (the record's ``bodySize``),
        and the content against the sha256 recorded when the body was
        written, if it was. ``data``: the body's bytes, already read by the
        caller (nothing is read again). Raises ``FileNotFoundError`` if the
        file is gone, and ``OSError`` (ELOOP) if it is a symbolic link.
        """
        with self._lock:
            state = self._states.get(key)
            sha256 = state.body_sha256 if state is not None else None
        if data is not None:
            got = hashlib.sha256(data).hexdigest() if sha256 is not None else None
            return body_mismatch(size, sha256, len(data), got)
        fd = _open_read(path)
        try:
            got_size = os.fstat(fd).st_size
            if got_size != size or sha256 is None:
                return body_mismatch(size, sha256, got_size, None)
            digest = hashlib.sha256()
            while True:
                chunk = os.read(fd, _CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
        finally:
            os.close(fd)
        return body_mismatch(size, sha256, got_size, digest.hexdigest())

    def clean_orphans(self) -> int:
        """Delete ``*.body`` files without a record and stale ``*.json.tmp`` files.

        Meant for the start, before tasks run; bodies this instance is still
        writing are spared anyway. Files not named by the spool's own pattern
        are never touched. Returns how many files were removed.
        """
        removed = 0
        with self._lock:  # invariant: see save(); no tmp file is being written now
            entries = list(self._entries())
            records = {key for key, kind, _ in entries if kind == _RECORD}
            for key, kind, path in entries:
                stale_tmp = kind in (_TMP, _GZ_TMP)
                live = key in self._states and self._states[key].live_body
                orphan = kind in (_BODY, _GZ) and key not in records and not live
                if (stale_tmp or orphan) and self._unlink(path):
                    log.info("spool: removed %s %s", "stale" if stale_tmp else "orphan", path.name)
                    removed += 1
        if removed:
            self._fsync_dir()
        return removed

    def size(self) -> int:
        """Number of saved results (journals of running tasks not counted); cheap
        (an in-memory count, no disk access)."""
        # One counter, kept with the states under the lock: reading it is a
        # single atomic read, so a metrics scrape takes no lock and never sees
        # a key counted half-way through a change.
        return self._size

    def __len__(self) -> int:
        return self.size()

    def __bool__(self) -> bool:
        # An empty spool is still a spool: ``if spool:`` must not depend on its size.
        return True

    def bytes_used(self) -> int:
        """Total size in bytes of the spool's own files (computed now, from the disk)."""
        total = 0
        for _, _, path in self._entries():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _check_key(key: object) -> str:
        if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
            raise ValueError(f"invalid spool key {key!r:.60}: expected 32 lowercase hex digits")
        return key

    def _path(self, key: str, suffix: str) -> Path:
        return Path(self._name(key, suffix))

    def _name(self, key: str, suffix: str) -> str:
        """The file of ``key`` with ``suffix``, as a plain string (the per-task hot
        paths use it as is, skipping pathlib's cost)."""
        return os.path.join(self._dir_name, self._check_key(key) + suffix)

    def _entries(self) -> Iterator[Tuple[str, str, Path]]:
        """``(key, suffix, path)`` of every regular file named by the spool's pattern."""
        with os.scandir(self._dir) as listing:
            for entry in listing:
                match = _NAME_RE.fullmatch(entry.name)
                if match is None:
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                yield match.group(1), match.group(2), Path(entry.path)

    def _scan(self, suffix: str) -> List[str]:
        return [key for key, kind, _ in self._entries() if kind == suffix]

    def _load(self, key: str) -> Optional[Tuple[int, Record]]:
        """Read one record: ``(mtime_ns, record)``, or None if gone, unreadable or corrupt."""
        path = self._path(key, _RECORD)
        try:
            fd = _open_read(path)
            try:
                mtime_ns = os.fstat(fd).st_mtime_ns
                raw = _read_fd(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # Left in place (and counted by nobody) so a human can look at it.
            self._report(key, "spool: cannot read record %s, skipped: %s", path.name, exc)
            return None
        record = _parse(raw)
        if record is not None:
            return mtime_ns, record
        corrupt = self._path(key, _CORRUPT)
        try:
            os.replace(path, corrupt)
        except OSError as exc:
            self._report(
                key, "spool: record %s is corrupt and could not be moved aside: %s", path.name, exc
            )
        else:
            self._report(
                key, "spool: record %s is corrupt, moved aside to %s", path.name, corrupt.name
            )
        return None

    def _report(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` once per key (lock held)."""
        state = self._states.get(key)
        if state is None or not state.reported:
            self._change(key, reported=True)
            log.warning(message, *args)

    @staticmethod
    def _unlink(path: Union[str, Path]) -> bool:
        """Unlink ``path``; False if it did not exist."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    @staticmethod
    def _write_new(path: Union[str, Path], data: bytes, *, sync: bool = True) -> None:
        """Create ``path`` afresh (0600) holding ``data``, (``sync``) fsynced;
        on failure no partial file is left.

        Raw descriptor calls only (open, write, fsync, close): each system
        call releases and re-takes the GIL, which under load is a futex
        round trip with other threads.
        """
        try:
            fd = _create_private(path)
        except FileExistsError:  # debris of an earlier crash; O_EXCL needs it gone
            os.unlink(path)
            fd = _create_private(path)
        try:
            try:
                _write_all(fd, data)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    @staticmethod
    def _fsync_file(path: Union[str, Path]) -> bool:
        """Fsync an existing file; False if it does not exist."""
        try:
            fd = os.open(path, os.O_RDWR | _O_BINARY | O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _forget(self, key: str) -> None:
        """Forget all about ``key`` but that it was reported (lock held): its files are gone."""
        state = self._states.get(key)
        if state is not None:
            self._change(
                key,
                record=False,
                journal=False,
                aside=False,
                leaving=False,
                live_body=False,
                synced_body=False,
                bodiless=False,
                body_sha256=None,
            )

    def _change(self, key: str, **values: Any) -> None:
        """Set fields of ``key``'s state (lock held), keeping ``_size`` exact;
        a state left empty is dropped."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _KeyState()
        before = state.counted
        for name, value in values.items():
            setattr(state, name, value)
        self._size += state.counted - before
        if state.empty:
            del self._states[key]

    def _note_rename(self) -> int:
        """Count a change of the folder's entries (a rename or unlinks; lock held):
        its number for ``_sync_folder``."""
        self._renamed += 1
        return self._renamed

    def _sync_folder(self, upto: int) -> None:
        """Make renames 1..``upto`` durable, sharing one folder fsync between callers.

        If a folder fsync is running, it may have started before our rename:
        wait for it, then look again; a later one covers us. Only one runs at
        a time, and it covers every rename done before it started.
        """
        with self._sync_cond:
            while self._synced < upto:
                if self._syncing:
                    self._sync_cond.wait(5.0)
                    continue
                self._syncing = True
                covers = self._renamed
                break
            else:
                return
        synced = False
        try:
            self._fsync_dir()
            synced = True
        finally:
            with self._sync_cond:
                self._syncing = False
                if synced:
                    self._synced = max(self._synced, covers)
                self._sync_cond.notify_all()

    def _fsync_dir(self) -> None:
        """Make the folder's entries (creates, renames, unlinks) durable, where possible."""
        if os.name != "posix":
            return  # Windows cannot open a directory as a file; NTFS journals entries itself
        fd = os.open(self._dir, os.O_RDONLY | _O_DIRECTORY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in _FSYNC_UNSUPPORTED:
                raise
        finally:
            os.close(fd)
