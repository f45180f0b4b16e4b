"""What every benchmark script shares: the repository on ``sys.path`` (so ``casam_core`` imports
from a checkout), the data folder and one description of the machine for the tables' headers.

A script runs as ``python benchmarks/NAME.py``: Python puts ``benchmarks/`` first on the path,
so ``from _common import REPO, DATA, machine`` comes first, before any ``casam_core`` import.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("CASAM_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"


def machine() -> str:
    """The CPU, its cores and bfloat16, torch and Python: the line each table's header starts with."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from casam_core.runtimes import native_bf16

        bf16 = "native bfloat16" if native_bf16() else "no native bfloat16"
    except ImportError:  # no OpenVINO
        bf16 = "bfloat16 not checked"
    return (f"{cpu}, {os.cpu_count()} cores ({bf16}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
