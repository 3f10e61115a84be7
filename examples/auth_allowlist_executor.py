"""An Executor that adds an auth header and refuses hosts outside an allow-list.

Run it: ``python examples/auth_allowlist_executor.py`` starts a fake AC
server and a fake target, runs two tasks (one allowed, one not) through the
real pipeline and checks the results. In production you would pass
``executor_class=AuthExecutor`` to ``Pipeline`` with your real config.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Dict
from urllib.parse import urlsplit

from acagent import AgentConfig, Executor, Pipeline, Result, Task
from acagent.testing import FakeACServer, FakeTarget


class AuthExecutor(Executor):
    #: hosts this agent may call; everything else is refused before connecting
    ALLOWED_HOSTS = frozenset({"127.0.0.1", "jira.internal.example"})

    def prepare_headers(self, task: Task) -> Dict[str, str]:
        headers = super().prepare_headers(task)
        # A token from the environment, never from the task, and never logged.
        headers["Authorization"] = f"Bearer {os.environ.get('TOOL_TOKEN', 'example-token')}"
        return headers

    def execute(self, task: Task, *, key: str) -> Result:
        host = urlsplit(task.url).hostname or ""
        if not task.is_fetch_logs and host not in self.ALLOWED_HOSTS:
            return Result.agent_error(
                task, f"host {host} is not allowed", failure="denied", key=key
            )
        return super().execute(task, key=key)


def main() -> int:
    with FakeTarget() as target, FakeACServer() as ac:
        ac.add_task({"taskId": "allowed", "method": "GET", "url": f"{target.url}/echo"})
        ac.add_task({"taskId": "denied", "method": "GET", "url": "http://elsewhere.example/x"})
        with tempfile.TemporaryDirectory() as spool:
            config = AgentConfig(
                server_url=ac.url, api_key="k", spool_dir=spool, poll_interval=0.05
            )
            with Pipeline(config, executor_class=AuthExecutor):
                if not ac.wait_for_results(2, timeout=30):
                    print("timed out waiting for results")
                    return 1
        allowed, denied = ac.results["allowed"][0], ac.results["denied"][0]
        sent_auth = any("Bearer example-token" in str(r.headers) for r in target.requests)
        ok = allowed.fields["statusCode"] == 200 and sent_auth and denied.via == "error"
        print(
            f"allowed: {allowed.via}, auth header sent: {sent_auth}; denied: {denied.fields['output']}"
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
