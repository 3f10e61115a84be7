"""hints.hint_for: AC failures mapped to the one-line action that fixes them."""

from __future__ import annotations

import socket
import ssl

import pytest
import requests
import urllib3.exceptions

from acagent import hints
from acagent.errors import ACConnectionError, ACHTTPError, ACRateLimitError
from acagent.hints import hint_for


def wrapped(inner: BaseException) -> ACConnectionError:
    """As ACClient raises it: ACConnectionError from the requests exception."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise ACConnectionError(f"get-task: {type(exc).__name__}: {exc}") from exc
    except ACConnectionError as outer:
        return outer


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key(status: int) -> None:
    assert hint_for(ACHTTPError("get-task", status, '{"error": "unauthorized"}')) == hints.HINT_API_KEY


def test_proxy_auth_status() -> None:
    assert hint_for(ACHTTPError("put-result", 407)) == hints.HINT_PROXY_AUTH


@pytest.mark.parametrize("status", [404, 500, 503])
def test_statuses_without_a_known_fix_have_no_hint(status: int) -> None:
    assert hint_for(ACHTTPError("get-task", status)) is None
    assert hint_for(ACRateLimitError("get-task", "slow down")) is None


def test_untrusted_certificate_names_ca_bundle() -> None:
    cert = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate")
    exc = requests.exceptions.SSLError(urllib3.exceptions.MaxRetryError(None, "/", cert))  # type: ignore[arg-type]
    assert hint_for(wrapped(exc)) == hints.HINT_CA_BUNDLE
    assert "--caBundle" in hints.HINT_CA_BUNDLE


def test_other_tls_failure_is_a_handshake_hint() -> None:
    exc = requests.exceptions.SSLError(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    assert hint_for(wrapped(exc)) == hints.HINT_TLS_HANDSHAKE


def test_proxy_failures() -> None:
    exc = requests.exceptions.ProxyError(urllib3.exceptions.ProxyError("Unable to connect to proxy", OSError("refused")))
    assert hint_for(wrapped(exc)) == hints.HINT_PROXY
    auth = requests.exceptions.ProxyError("Tunnel connection failed: 407 Proxy Authentication Required")
    assert hint_for(wrapped(auth)) == hints.HINT_PROXY_AUTH


def test_dns_failure_from_a_real_lookup() -> None:
    with pytest.raises(requests.ConnectionError) as info:
        requests.get("http://no-such-host.invalid/", timeout=10)
    assert hint_for(wrapped(info.value)) == hints.HINT_DNS
    assert hint_for(socket.gaierror(socket.EAI_NONAME, "Name or service not known")) == hints.HINT_DNS


def test_refused_connection_from_a_real_socket() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(requests.ConnectionError) as info:
        requests.get(f"http://127.0.0.1:{port}/", timeout=10)
    assert hint_for(wrapped(info.value)) == hints.HINT_REFUSED


def test_connect_timeout() -> None:
    exc = requests.exceptions.ConnectTimeout("connect timed out")
    assert hint_for(wrapped(exc)) == hints.HINT_TIMEOUT


def test_unknown_errors_have_no_hint_and_cycles_end() -> None:
    a = ValueError("a")
    b = ValueError("b")
    a.__context__ = b
    b.__context__ = a
    assert hint_for(a) is None


def test_every_hint_is_one_line() -> None:
    for name in hints.__all__:
        if name.startswith("HINT_"):
            assert "\n" not in getattr(hints, name)
