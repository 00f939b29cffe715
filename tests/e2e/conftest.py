"""End-to-end tests: real MLX workers forming a real ring on loopback aliases (127.0.0.21-23).

Everything is real except the Macs: ``mlx[cpu]``, ``mlx_lm.server --pipeline`` and the ring
backend run as local processes, each with ``MLX_RANK`` and ``MLX_HOSTFILE`` as launchd would set
them. Nothing is skipped: without mlx and mlx-lm installed (``pip install -e '.[mlx,test]'``)
these tests fail at import.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e runs real MLX workers: mark it so ``-m e2e`` selects them."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)
