"""acagent: the ArmorCode on-premises agent as a library.

Public API::

    from acagent import AgentConfig, Pipeline
    with Pipeline(AgentConfig(server_url=..., api_key=...)) as agent:
        ...

Stages are customised by subclassing ``Fetcher``, ``Executor`` and
``Uploader`` and passing a factory (the class, or ``functools.partial`` of
it) to ``Pipeline`` (see ``examples/``); ``acagent.testing`` has a fake AC
server.
"""

from __future__ import annotations

from ._version import __version__
from .ac.backoff import Backoff
from .ac.client import ACClient
from .ac.retry import RetryPolicy
from .config import AgentConfig
from .delivery import Delivery
from .errors import (
    ACConnectionError,
    ACError,
    ACHTTPError,
    ACRateLimitError,
    AgentError,
    AgentStopping,
    BadReplyError,
    ConfigError,
    SpoolLockedError,
    TargetFailure,
    TaskError,
    UploadURLRefused,
)
from .executor import Executor
from .fetcher import Fetcher
from .globalconfig import RuntimeSettings
from .ledger import Ledger
from .metrics import AgentMetrics
from .models import Result, Task
from .observers import Observer, Observers
from .pipeline import Pipeline
from .spool import ResultSpool
from .stage import Stage, StageContext
from .uploader import Uploader

__all__ = [
    "ACClient",
    "ACConnectionError",
    "ACError",
    "ACHTTPError",
    "ACRateLimitError",
    "AgentConfig",
    "AgentError",
    "AgentMetrics",
    "AgentStopping",
    "Backoff",
    "BadReplyError",
    "ConfigError",
    "Delivery",
    "Executor",
    "Fetcher",
    "Ledger",
    "Observer",
    "Observers",
    "Pipeline",
    "Result",
    "ResultSpool",
    "RetryPolicy",
    "RuntimeSettings",
    "SpoolLockedError",
    "Stage",
    "StageContext",
    "TargetFailure",
    "Task",
    "TaskError",
    "UploadURLRefused",
    "Uploader",
    "__version__",
]
