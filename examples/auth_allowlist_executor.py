"""An Executor that adds the tool's credentials, behind the built-in allow-list.

Run it: ``python examples/auth_allowlist_executor.py`` starts a fake AC
server and a fake target, runs two tasks (one allowed, one not) through the
real pipeline and checks the results.

Which hosts the agent may call is the agent's own job: set
``AgentConfig(allowed_targets=...)`` (``--allowedTargets``), which is
enforced on the connection actually made, on every redirect hop. Do not
re-implement it in a subclass. This example only adds what the built-in
executor does not know: a credential from the environment, never from the
task, and never logged. In production:
``Pipeline(config, executor=functools.partial(AuthExecutor, token=...))``.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from typing import Dict

from typing_extensions import override

from acagent import AgentConfig, Executor, Pipeline, StageContext, Task
from acagent.testing import FakeACServer, FakeTarget


class AuthExecutor(Executor):
    def __init__(self, ctx: StageContext, *, token: str) -> None:
        super().__init__(ctx)
        self._token = token

    @override
    def prepare_headers(self, task: Task) -> Dict[str, str]:
        headers = super().prepare_headers(task)
        headers["Authorization"] = f"Bearer {self._token}"
        return headers


def main() -> int:
    with FakeTarget() as target, FakeACServer() as ac:
        ac.add_task({"taskId": "allowed", "method": "GET", "url": f"{target.url}/echo"})
        ac.add_task({"taskId": "denied", "method": "GET", "url": "http://elsewhere.example/x"})
        with tempfile.TemporaryDirectory() as spool:
            config = AgentConfig(
                server_url=ac.url,
                api_key="k",
                spool_dir=spool,
                poll_interval=0.05,
                allowed_targets=("127.0.0.1",),
            )
            token = os.environ.get("TOOL_TOKEN", "example-token")
            with Pipeline(config, executor=functools.partial(AuthExecutor, token=token)):
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
