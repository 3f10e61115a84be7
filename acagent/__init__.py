"""acagent: the ArmorCode on-premises agent as a library.

Public API::

    from acagent import AgentConfig, Pipeline
    with Pipeline(AgentConfig(server_url=..., api_key=...)) as agent:
        ...

Stages are customised by subclassing ``Fetcher``, ``Executor`` and
``Uploader`` (see ``examples/``); ``acagent.testing`` has a fake AC server.
"""

from __future__ import annotations

__version__ = "2.0.0"

from .client import ACClient
from .config import AgentConfig
from .errors import (
    ACConnectionError,
    ACError,
    ACHTTPError,
    ACRateLimitError,
    AgentError,
    AgentStopping,
    BadReplyError,
    ConfigError,
    TaskError,
)
from .executor import Executor
from .fetcher import Fetcher
from .models import Result, Task
from .pipeline import Pipeline
from .retry import RetryPolicy
from .uploader import Uploader

__all__ = [
    "ACClient",
    "ACConnectionError",
    "ACError",
    "ACHTTPError",
    "ACRateLimitError",
    "AgentConfig",
    "AgentError",
    "AgentStopping",
    "BadReplyError",
    "ConfigError",
    "Executor",
    "Fetcher",
    "Pipeline",
    "Result",
    "RetryPolicy",
    "Task",
    "TaskError",
    "Uploader",
    "__version__",
]
