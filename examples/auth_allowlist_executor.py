"""An Executor that adds the tool's credentials, behind the built-in allow-list.

Run it: ``python examples/auth_allowlist_executor.py`` starts a fake AC
server and a fake target, runs two tasks (one allowed, one not) through the
real pipeline and checks the results: the allowed one reached the target
with the credential, the other was refused by the allow-list itself (an
address outside ``allowed_targets``, refused before any connection or DNS
lookup) and answered with the allow-list's own error.

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

#: an address outside the allow-list below, and what the agent answers for it
DENIED_HOST = "10.0.0.7"
DENIED_OUTPUT = f"Agent Side Error: target host not in the allow-list: {DENIED_HOST}"


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
        # 10.0.0.7 is not in the allow-list: refused before any connection is made.
        ac.add_task({"taskId": "denied", "method": "GET", "url": f"http://{DENIED_HOST}/x"})
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
        refusal = denied.fields.get("output")
        ok = (
            allowed.fields["statusCode"] == 200
            and sent_auth
            and denied.fields["statusCode"] == 500
            and refusal == DENIED_OUTPUT
        )
        print(f"allowed: {allowed.via}, auth header sent: {sent_auth}; denied: {refusal}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
