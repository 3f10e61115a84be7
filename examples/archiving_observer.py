"""An observer that archives every result the AC server accepted.

Run it: ``python examples/archiving_observer.py [ARCHIVE_DIR]``. Each result
the server accepted ends up as ``ARCHIVE_DIR/<taskId>.json`` (the result
metadata) and ``<taskId>.body`` (the body bytes, if any). In production:
``Pipeline(config, observers=[ArchivingObserver(archive_dir)])``.

Why an observer and not an ``Uploader.deliver`` override: an exception in
``deliver`` means "not delivered", so a failing archive write there would
send the same result to the server again. An observer's failure is logged
and changes nothing else: the result is delivered once whatever the archive
does.

Why the body is copied when the task finishes: once the server accepted a
result, the agent removes its spool files on another thread, so the body may
already be gone when ``on_result_delivered`` runs. ``on_task_executed`` runs
before the result is queued, while its body is surely there; the copy waits
in ``ARCHIVE_DIR/.staging`` and is moved into the archive on delivery.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from typing_extensions import override

from acagent import AgentConfig, Observer, Pipeline, Result
from acagent.testing import FakeACServer, FakeTarget, expected_body


def _safe(task_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in task_id)


class ArchivingObserver(Observer):
    def __init__(self, archive_dir: str) -> None:
        self.archive_dir = archive_dir
        self.staging = os.path.join(archive_dir, ".staging")

    @override
    def on_task_executed(self, result: Result, seconds: float) -> None:
        if not result.body_size:
            return
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        # A small body is kept in the result itself, a larger one in a file:
        # open_body() reads either.
        with result.open_body() as src:
            with open(os.path.join(self.staging, _safe(result.task_id)), "wb") as out:
                shutil.copyfileobj(src, out)

    @override
    def on_result_delivered(self, result: Result, via: str, seconds: float) -> None:
        safe = _safe(result.task_id)
        meta = {"taskId": result.task_id, "statusCode": result.status_code, "via": via}
        with open(os.path.join(self.archive_dir, f"{safe}.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
        staged = os.path.join(self.staging, safe)
        if os.path.exists(staged):
            os.replace(staged, os.path.join(self.archive_dir, f"{safe}.body"))

    @override
    def on_result_quarantined(self, result: Result, reason: str) -> None:
        staged = os.path.join(self.staging, _safe(result.task_id))
        if os.path.exists(staged):
            os.remove(staged)


SIZES = (10, 700_000)


def main(argv: list[str]) -> int:
    archive = argv[0] if argv else tempfile.mkdtemp(prefix="acagent-archive-")
    with FakeTarget() as target, FakeACServer() as ac:
        for i, size in enumerate(SIZES):
            ac.add_task(
                {"taskId": f"t{i}", "method": "GET", "url": f"{target.url}/bytes/{size}?seed={i}"}
            )
        with tempfile.TemporaryDirectory() as spool:
            config = AgentConfig(
                server_url=ac.url, api_key="k", spool_dir=spool, poll_interval=0.05
            )
            with Pipeline(config, observers=[ArchivingObserver(archive)]):
                if not ac.wait_for_results(len(SIZES), timeout=30):
                    print("timed out waiting for results")
                    return 1
    ok = True
    for i, size in enumerate(SIZES):
        with open(os.path.join(archive, f"t{i}.body"), "rb") as fh:
            ok = ok and fh.read() == expected_body(size, i)
    names = sorted(n for n in os.listdir(archive) if not n.startswith("."))
    print(f"archived to {archive}: {names}; bodies match: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
