"""Kept-alive connections that do not outlive changes: ``ConnectionAges``.

The agent keeps its AC connections open for as long as they work. Without a
limit, a rotated server certificate, a revoked intermediate or a load
balancer that moved is noticed only when a connection breaks. So a
connection older than ``max_age`` is closed when its pool hands it out for
the next request (between two requests, never during one) and the request
goes out on a fresh one: a new TLS handshake, a new DNS lookup. A server
certificate that differs from the one the last connection to that host saw
is counted and logged once, at INFO.

For callers: ``ConnectionAges(max_age, what)``, ``pool_classes(classes)``
(wraps an adapter's pool classes), the counters ``retired`` and
``certificate_changes``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Dict, Optional, Tuple, Type

from urllib3.connectionpool import HTTPConnectionPool

log = logging.getLogger("acagent.connage")


class ConnectionAges:
    """Retires connections older than ``max_age`` seconds (0 = never) and notes
    certificate changes; ``what`` names the connections in log lines."""

    def __init__(self, max_age: float, what: str) -> None:
        self.max_age = max_age
        self.what = what
        self._lock = threading.Lock()
        self._certificates: Dict[Tuple[str, int], str] = {}
        #: connections closed for their age
        self.retired = 0
        #: connections that met another certificate than the one before
        self.certificate_changes = 0

    def pool_classes(
        self, classes: Dict[str, Type[HTTPConnectionPool]]
    ) -> Dict[str, Type[HTTPConnectionPool]]:
        """The same pool classes, with connections that know their age."""
        return {scheme: self._aged(pool) for scheme, pool in classes.items()}

    def _aged(self, pool: Type[HTTPConnectionPool]) -> Type[HTTPConnectionPool]:
        ages = self
        base = pool.ConnectionCls

        def connect(conn: Any) -> None:
            base.connect(conn)
            ages.opened(conn)

        def get_conn(self: Any, timeout: Optional[float] = None) -> Any:
            conn = pool._get_conn(self, timeout)
            ages.checkout(conn)
            return conn

        # urllib3's class names are kept, so error messages read as before
        connection = type(base.__name__, (base,), {"connect": connect})
        return type(pool.__name__, (pool,), {"ConnectionCls": connection, "_get_conn": get_conn})

    def opened(self, conn: Any) -> None:
        """``conn`` just connected: note when, and the server's certificate."""
        conn._acagent_opened_at = time.monotonic()
        sock = getattr(conn, "sock", None)
        getpeercert = getattr(sock, "getpeercert", None)
        if getpeercert is None:
            return  # plain http
        der = getpeercert(binary_form=True)
        if not der:
            return
        fingerprint = hashlib.sha256(der).hexdigest()
        host = (str(conn.host), int(conn.port or 443))
        with self._lock:
            before = self._certificates.get(host)
            self._certificates[host] = fingerprint
            changed = before is not None and before != fingerprint
            if changed:
                self.certificate_changes += 1
        if changed:
            log.info(
                "%s %s:%d presents a new TLS certificate (sha256 %s...); "
                "new connections use it",
                self.what,
                host[0],
                host[1],
                fingerprint[:16],
            )

    def checkout(self, conn: Any) -> None:
        """The pool hands ``conn`` out for a request: close it first if too old."""
        if self.max_age <= 0 or getattr(conn, "sock", None) is None:
            return
        opened = getattr(conn, "_acagent_opened_at", None)
        if opened is not None and time.monotonic() - opened >= self.max_age:
            conn.close()  # the pool's request connects it again
            with self._lock:
                self.retired += 1
            log.debug("%s connection to %s closed after %.0fs", self.what, conn.host, self.max_age)
