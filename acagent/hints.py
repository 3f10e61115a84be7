"""One-line hints that tell an operator what to change when an AC call fails.

``hint_for(exc)`` looks at an exception raised by ``ACClient`` (or by
requests/urllib3 underneath it, found through ``__cause__``/``__context__``)
and returns the action that usually fixes it, or None when it knows none.
Pure: no I/O, no logging; ``acagent check`` and the stages use it.
"""

from __future__ import annotations

import socket
import ssl
from typing import Iterator, Optional

import requests
import urllib3.exceptions

from .config import AC_SERVER_CONCURRENT_LIMIT, AgentConfig
from .errors import ACHTTPError

__all__ = [
    "AUTH_HINT",
    "CONCURRENCY_HINT",
    "HINT_API_KEY",
    "HINT_CA_BUNDLE",
    "HINT_DNS",
    "HINT_PROXY",
    "HINT_PROXY_AUTH",
    "HINT_REFUSED",
    "HINT_TIMEOUT",
    "HINT_TLS_HANDSHAKE",
    "auth_hint",
    "hint_for",
]

HINT_API_KEY = "the AC server refused the API key: check --apiKey / api_key"
#: the hint logged when the AC server refuses an API key given by flag or environment
AUTH_HINT = HINT_API_KEY + (
    " (a key given so cannot change while the agent runs; --apiKeyFile is re-read,"
    " so a rotated key needs no restart)"
)
#: what a "Too many concurrent requests" 429 means, for the log line
CONCURRENCY_HINT = (
    f"Too many concurrent requests (429): more than {AC_SERVER_CONCURRENT_LIMIT} AC requests "
    "were in flight on this API key (another agent on the same key? see --coordinationUrl)"
)
HINT_CA_BUNDLE = (
    "the server's TLS certificate is not trusted: pass --caBundle <file> with the CA "
    "that signed it (e.g. your proxy's CA), rather than --verify false"
)
HINT_TLS_HANDSHAKE = (
    "the TLS handshake failed: check that --serverUrl uses https:// only where the "
    "server speaks TLS, and the port"
)
HINT_PROXY = (
    "the proxy could not be reached or refused the connection: check "
    "--outgoingProxyHttps / --outgoingProxyHttp (or HTTPS_PROXY / NO_PROXY)"
)
HINT_PROXY_AUTH = (
    "the proxy asks for credentials (HTTP 407): put user:password in the proxy URL "
    "of --outgoingProxyHttps / --outgoingProxyHttp"
)
HINT_DNS = (
    "the host name does not resolve: check the host in --serverUrl / server_url "
    "and this machine's DNS (or set --outgoingProxyHttps if only a proxy can resolve it)"
)
HINT_REFUSED = (
    "nothing answers at that address and port: check --serverUrl / server_url "
    "and any firewall between this host and the AC server"
)
HINT_TIMEOUT = (
    "the connection timed out: check the firewall, --serverUrl, and whether an "
    "outgoing proxy (--outgoingProxyHttps) is required"
)

_DNS_MARKERS = (
    "name or service not known",
    "nodename nor servname",
    "temporary failure in name resolution",
    "no address associated with hostname",
    "getaddrinfo failed",
    "failed to resolve",
    "name resolution",
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes and contexts (each once), then wrapped reasons."""
    seen = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for nxt in (current.__cause__, current.__context__, getattr(current, "reason", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
        # requests wraps urllib3's MaxRetryError as args[0] of its ConnectionError
        for arg in getattr(current, "args", ()):
            if isinstance(arg, BaseException):
                todo.append(arg)


def auth_hint(config: AgentConfig) -> str:
    """What to do when the AC server refuses the key, for where the key came from."""
    if config.api_key_file is None:
        return AUTH_HINT
    return (
        f"the AC server refused the API key read from {config.api_key_file}: put the right key "
        "there (--apiKeyFile; it is re-read every few seconds, and on SIGHUP)"
    )


def hint_for(exc: BaseException) -> Optional[str]:
    """The action that usually fixes ``exc``, as one line; None if there is none to give."""
    chain = list(_chain(exc))
    for item in chain:
        if isinstance(item, ACHTTPError):
            if item.status in (401, 403):
                return HINT_API_KEY
            if item.status == 407:
                return HINT_PROXY_AUTH
    texts = " ".join(str(item) for item in chain).lower()
    if any(
        isinstance(item, (requests.exceptions.ProxyError, urllib3.exceptions.ProxyError))
        for item in chain
    ):
        return HINT_PROXY_AUTH if "407" in texts else HINT_PROXY
    if any(isinstance(item, (requests.exceptions.SSLError, ssl.SSLError)) for item in chain):
        if "certificate" in texts or "self signed" in texts or "self-signed" in texts:
            return HINT_CA_BUNDLE
        return HINT_TLS_HANDSHAKE
    if any(isinstance(item, socket.gaierror) for item in chain) or any(
        marker in texts for marker in _DNS_MARKERS
    ):
        return HINT_DNS
    if any(isinstance(item, ConnectionRefusedError) for item in chain) or (
        "connection refused" in texts
    ):
        return HINT_REFUSED
    timeouts = (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)
    if any(isinstance(item, timeouts) for item in chain):
        return HINT_TIMEOUT
    return None
