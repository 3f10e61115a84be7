"""A ``requests.Session`` that reads the environment once per host: ``EnvCachedSession``.

The AC client's session and the target sessions both build on it.
"""

from __future__ import annotations

from typing import Any, Dict

import requests


class EnvCachedSession(requests.Session):
    """A ``requests.Session`` that reads the proxy/CA environment once per host.

    With ``trust_env`` on, requests scans all of ``os.environ`` twice on every
    request (``*_proxy`` and ``no_proxy``): a third of the CPU of an AC call in
    the benchmark, and more with the many variables of a Kubernetes pod. The
    agent's environment does not change while it runs, so the merged settings
    are cached per (scheme, host, call arguments, session settings). Set the
    environment before creating the session.
    """

    _ENV_CACHE_MAX = 256

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> Any:
        scheme, _, rest = str(url).partition("://")
        key = (
            scheme.lower(),
            rest.split("/", 1)[0].split("?", 1)[0],
            tuple(sorted(proxies.items())) if proxies else None,
            stream,
            verify,
            tuple(cert) if isinstance(cert, (list, tuple)) else cert,
            self.trust_env,
            tuple(sorted(self.proxies.items())),
            self.stream,
            self.verify,
            tuple(self.cert) if isinstance(self.cert, (list, tuple)) else self.cert,
        )
        cache: Dict[Any, Any] = self.__dict__.setdefault("_env_cache", {})
        merged = cache.get(key)
        if merged is None:
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if len(cache) >= self._ENV_CACHE_MAX:
                cache.clear()
            cache[key] = merged
        return {**merged, "proxies": dict(merged["proxies"] or {})}
