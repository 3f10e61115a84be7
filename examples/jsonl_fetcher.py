"""A Fetcher that reads tasks from a local JSON-lines file instead of get-task.

Run it: ``python examples/jsonl_fetcher.py [TASKS.jsonl]``. Each line is one
task object (docs/protocol.md "The task"); results still go to the AC server.
Backpressure, the spool and shutdown work as with the real Fetcher, because
only the ``fetch_one`` hook is replaced. Settings reach the stage through
its constructor: ``Pipeline(config, fetcher=functools.partial(JsonlFetcher, path=...))``.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import threading
from typing import IO, Optional

from typing_extensions import override

from acagent import AgentConfig, Fetcher, Pipeline, StageContext, Task
from acagent.testing import FakeACServer, FakeTarget


class JsonlFetcher(Fetcher):
    def __init__(self, ctx: StageContext, *, path: str) -> None:
        super().__init__(ctx)
        self.path = path
        self._file: Optional[IO[str]] = None
        self._lock = threading.Lock()

    @override
    def fetch_one(self) -> Optional[Task]:
        with self._lock:
            if self._file is None:
                self._file = open(self.path, encoding="utf-8")  # kept open across calls
            for line in self._file:
                if line.strip():
                    # the lifetime of a task without expiryTsMs, as get-task's tasks get
                    return Task.parse(json.loads(line), default_ttl=self.config.default_task_ttl)
        return None  # end of file: the Fetcher idles as on an empty get-task

    @override
    def on_stop(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()


def main(argv: list[str]) -> int:
    with FakeTarget() as target, FakeACServer() as ac:
        if argv:
            path = argv[0]
            expected = None
        else:
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
                for i in range(5):
                    url = f"{target.url}/bytes/{100 * i}?seed={i}"
                    fh.write(
                        json.dumps({"taskId": f"file-{i}", "method": "GET", "url": url}) + "\n"
                    )
            path = fh.name
            expected = 5
        with tempfile.TemporaryDirectory() as spool:
            config = AgentConfig(
                server_url=ac.url, api_key="k", spool_dir=spool, poll_interval=0.05
            )
            with Pipeline(config, fetcher=functools.partial(JsonlFetcher, path=path)):
                ok = ac.wait_for_results(expected or 1, timeout=30)
        print(f"results received: {sorted(ac.results)}; get-task calls: {ac.count('get-task')}")
        return 0 if ok and ac.count("get-task") == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
