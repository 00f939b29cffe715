"""Run a `TestHub` as its own process, for the sandbox: `python -m orchestrator.simulator.hubd`.

The sandbox's hub must outlive `orch sandbox up` (every later `orch plan` reads the model's
metadata from it), so it runs detached and is stopped by pid with `orch sandbox down`.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from orchestrator.simulator.hub import TestHub


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve model directories as a local Hub")
    parser.add_argument("--repo", action="append", default=[], metavar="ID=DIR",
                        help="serve DIR as repository ID (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, required=True,
                        help="written (JSON: endpoint, commits) once the hub answers")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with TestHub(host=args.host, port=args.port) as hub:
        commits = {}
        for item in args.repo:
            repo_id, _, directory = item.partition("=")
            commits[repo_id] = hub.add_repo(repo_id, Path(directory))
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"endpoint": hub.endpoint, "commits": commits}))
        tmp.replace(args.ready_file)
        stop.wait()


if __name__ == "__main__":
    main()
