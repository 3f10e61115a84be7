"""An Uploader that also archives each result to a folder.

Run it: ``python examples/archiving_uploader.py [ARCHIVE_DIR]``. Each result
the server accepted is copied to ``ARCHIVE_DIR/<taskId>.json`` (the result
metadata) and ``<taskId>.body`` (the body bytes, if any). The folder reaches
the stage through its constructor:
``Pipeline(config, uploader=functools.partial(ArchivingUploader, archive_dir=...))``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile

from typing_extensions import override

from acagent import AgentConfig, Pipeline, Result, StageContext, Uploader
from acagent.testing import FakeACServer, FakeTarget, expected_body


class ArchivingUploader(Uploader):
    def __init__(self, ctx: StageContext, *, archive_dir: str) -> None:
        super().__init__(ctx)
        self.archive_dir = archive_dir

    @override
    def deliver(self, result: Result) -> str:
        via = super().deliver(result)  # raises if the server did not accept it
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in result.task_id)
        os.makedirs(self.archive_dir, mode=0o700, exist_ok=True)
        meta = {"taskId": result.task_id, "statusCode": result.status_code, "via": via}
        with open(os.path.join(self.archive_dir, f"{safe}.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
        if result.body_size:
            # A small body is kept in the result itself, a larger one in a file:
            # open_body() reads either.
            with result.open_body() as src:
                with open(os.path.join(self.archive_dir, f"{safe}.body"), "wb") as out:
                    shutil.copyfileobj(src, out)
        return via


def main(argv: list[str]) -> int:
    archive = argv[0] if argv else tempfile.mkdtemp(prefix="acagent-archive-")
    with FakeTarget() as target, FakeACServer() as ac:
        for i, size in enumerate((10, 700_000)):
            ac.add_task(
                {"taskId": f"t{i}", "method": "GET", "url": f"{target.url}/bytes/{size}?seed={i}"}
            )
        with tempfile.TemporaryDirectory() as spool:
            config = AgentConfig(
                server_url=ac.url, api_key="k", spool_dir=spool, poll_interval=0.05
            )
            uploader = functools.partial(ArchivingUploader, archive_dir=archive)
            with Pipeline(config, uploader=uploader):
                if not ac.wait_for_results(2, timeout=30):
                    print("timed out waiting for results")
                    return 1
    ok = True
    for i, size in enumerate((10, 700_000)):
        with open(os.path.join(archive, f"t{i}.body"), "rb") as fh:
            ok = ok and fh.read() == expected_body(size, i)
    print(f"archived to {archive}: {sorted(os.listdir(archive))}; bodies match: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
