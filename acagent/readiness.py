"""Readiness: is the agent able to do its job right now, and if not, why.

An observer: it hears every AC exchange (``ReadinessTracker`` turns them into
"the AC server answers"), and asks the Ledger for its holds (the API key
refused, the spool full, the coordination server unreachable, ...) when
asked itself. ``check`` gives ``/readyz`` its answer with the reason an
operator can act on.
"""

from __future__ import annotations

from typing import Callable, List, Mapping, Tuple

from .health import ReadinessTracker
from .hints import AUTH_HINT
from .observers import Observer


class Readiness(Observer):
    """``holds``: the reasons fetching is held for now (``Ledger.holds``)."""

    def __init__(
        self,
        window: float,
        auth_hint: str = AUTH_HINT,
        *,
        holds: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        #: what /readyz says while the server refuses the key (``hints.auth_hint``)
        self.auth_hint = auth_hint
        self.tracker = ReadinessTracker(window)
        self._holds = holds
        self._key_refused = False
        self._checks: List[Callable[[], Tuple[bool, str]]] = []

    def add_check(self, check: Callable[[], Tuple[bool, str]]) -> None:
        """Another condition for readiness (e.g. the shared permits' coordination server)."""
        self._checks.append(check)

    def on_exchange(self, endpoint: str, status: str, seconds: float) -> None:
        if endpoint == "s3" or status == "resend":
            return
        code = int(status) if status.isdigit() else None
        if code in (401, 403):
            self._key_refused = True
            self.tracker.record_failure()
            return
        if code is not None and code < 300:
            self._key_refused = False
            self.tracker.record_success()
        elif status == "error" or (code is not None and code >= 500):
            self.tracker.record_failure()

    def check(self) -> Tuple[bool, str]:
        holds = list(self._holds().values())
        if holds:
            return False, "; ".join(holds)
        for check in self._checks:
            ok, reason = check()
            if not ok:
                return False, reason
        if self._key_refused:
            return False, self.auth_hint
        return self.tracker.check()
