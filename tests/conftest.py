"""How the suite runs side by side (``scripts/test`` uses pytest-xdist, ``--dist loadgroup``).

The e2e tests and the integration tests each run in one worker, in file order: they start
simulated Macs on fixed loopback addresses and share session fixtures (one serving sandbox,
one set of test hosts), which must not be started twice or overlap. The two groups use
disjoint addresses (integration 127.0.0.1x-4x apart from the sandbox's .41-.43; e2e .21-.23,
.41-.43, .51-.53), so they can run at the same time. Unit tests are spread over whichever
worker is free.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
SERIAL_GROUPS = ("e2e", "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.path)).relative_to(HERE).parts
        if parts and parts[0] in SERIAL_GROUPS:
            item.add_marker(pytest.mark.xdist_group(parts[0]))
