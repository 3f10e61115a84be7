"""The exception types of acagent, in one place so callers can catch precisely."""

from __future__ import annotations

from typing import Any, Optional


class AgentError(Exception):
    """Base of every error acagent raises on purpose."""


class ConfigError(AgentError, ValueError):
    """A setting is invalid. ``field`` names the AgentConfig field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


class TaskError(AgentError, ValueError):
    """A task object from the server is malformed.

    ``task_id`` is set when the task had a usable id, so the agent can still
    answer it with an ``Agent Side Error`` result.
    """

    def __init__(
        self, reason: str, *, task_id: Optional[str] = None, raw: Optional[Any] = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.task_id = task_id
        #: the task object as received (set by the client), so a result can echo it
        self.raw = raw


class ACError(AgentError):
    """A call to the AC server failed."""


class ACConnectionError(ACError):
    """The AC server could not be reached, or the connection broke."""


class ACHTTPError(ACError):
    """The AC server answered with an unexpected status."""

    def __init__(self, endpoint: str, status: int, body: str = "") -> None:
        snippet = body[:200].replace("\n", " ")
        super().__init__(f"{endpoint}: HTTP {status}" + (f": {snippet}" if snippet else ""))
        self.endpoint = endpoint
        self.status = status
        self.body = body


class ACRateLimitError(ACHTTPError):
    """A 429. ``retry_after`` is the server's wait in seconds (clamped), if it gave one."""

    def __init__(
        self,
        endpoint: str,
        body: str = "",
        *,
        retry_after: Optional[float] = None,
        concurrency: bool = False,
        limit_lowered: bool = False,
    ) -> None:
        super().__init__(endpoint, 429, body)
        self.retry_after = retry_after
        #: the server said "Too many concurrent requests" (not a rate limit)
        self.concurrency = concurrency
        #: the agent's effective AC limit was lowered for it (``ac/adaptive.py``)
        self.limit_lowered = limit_lowered


class BadReplyError(ACError):
    """The AC server answered 2xx with a body the protocol does not allow."""


class UnreadReplyError(BadReplyError):
    """A 2xx reply whose body the agent would not read whole: it decodes past
    the reply cap, or has a Content-Encoding the agent did not ask for."""


class UploadURLRefused(BadReplyError):
    """A presigned upload URL the upload policy refuses (scheme, internal address)."""


class AgentStopping(AgentError):
    """The agent is stopping; a wait or retry loop was cut short."""


class SpoolLockedError(AgentError):
    """Another agent process holds the spool folder (one agent per folder)."""

    def __init__(self, directory: str, holder_pid: str) -> None:
        super().__init__(
            f"spool folder {directory} is in use by another agent (pid {holder_pid}); "
            "give each agent its own --spoolDir"
        )
        self.directory = directory
        self.holder_pid = holder_pid


class TargetFailure(AgentError):
    """A task could not be completed; ``reason`` goes into the error result."""

    def __init__(self, reason: str, slug: str) -> None:
        super().__init__(reason)
        self.reason = reason
        #: short name of the failure (a metrics label), e.g. ``"timeout"``
        self.slug = slug
