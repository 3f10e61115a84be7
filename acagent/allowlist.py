"""The target allow-list (``--allowedTargets``): which hosts a task may reach.

Entries are host names (``jira.corp``), wildcards (``*.corp``, matching any
sub-domain but not ``corp`` itself) and CIDRs (``10.0.0.0/8``, matched
against IP-literal URLs). An empty list allows every host. The check runs
before any connection is made, and again on every redirect hop.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from typing import Iterable, List, Optional, Tuple, Union
from urllib.parse import urlsplit

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class TargetAllowList:
    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.names: List[str] = []
        self.patterns: List[str] = []
        self.networks: List[_Network] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            if "/" in entry or _is_ip(entry):
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            elif "*" in entry or "?" in entry:
                self.patterns.append(entry)
            else:
                self.names.append(entry)

    @classmethod
    def parse(cls, text: str) -> TargetAllowList:
        """From a comma-separated flag value; raises ValueError for a bad CIDR."""
        return cls(part for part in text.split(",") if part.strip())

    @property
    def enabled(self) -> bool:
        return bool(self.names or self.patterns or self.networks)

    def allows_url(self, url: str) -> bool:
        host = host_of(url)
        return host is not None and self.allows_host(host)

    def allows_host(self, host: str) -> bool:
        if not self.enabled:
            return True
        host = host.strip("[]").lower().rstrip(".")
        if _is_ip(host):
            address = ipaddress.ip_address(host)
            return any(address in net for net in self.networks) or host in self.names
        if host in self.names:
            return True
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.patterns)

    def describe(self) -> Tuple[str, ...]:
        return tuple(self.names + self.patterns + [str(n) for n in self.networks])


def host_of(url: str) -> Optional[str]:
    """The host name of ``url``, or None if it has none or does not parse."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
