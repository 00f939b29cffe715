"""The controller of one bench run: the real ``orch apply``, with the model's files per node
given by hand (``python -m bench.sync_apply CLUSTER FILES.json KNOWN_HOSTS``).

Why a process of its own: its peak RSS is the controller's, measured by the bench from the
kernel (``wait4``), with nothing else (the Hub, the bench's sampler) in it. Everything below
the file lists is real: the Hub's tree API and manifest, facts, the plan and its sources,
SSH, the agents, the peer servers. The placement is replaced
(`orchestrator.simulator.files_only`) because the bench's model is random bytes (no
safetensors header to place by): each scenario's files per node (every file on every node,
for tensor parallelism) are given by hand.
"""

from __future__ import annotations

import os
import sys

from orchestrator.cli import main
from orchestrator.run import transfers
from orchestrator.simulator import files_only

if __name__ == "__main__":
    if os.environ.get("ORCH_BENCH_STORE_AND_FORWARD"):
        transfers.RELAY = False  # the bench's baseline: each copy waits for a whole file
    main(files_only.apply_argv([*sys.argv[1:4], "--log-format", "json", "-q"]))
