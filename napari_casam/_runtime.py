"""Keep torch's Triton out of a process whose OpenGL driver already holds another LLVM.

Under Mesa's software OpenGL (llvmpipe: Xvfb, remote desktops, VMs without a GPU), the
driver maps its own ``libLLVM``. Triton, which torch and torchvision import when they
register their operators, carries a second, incompatible LLVM: loading it into that
process segfaults napari. This is what happened when the widget was opened from the
Plugins menu of a running viewer (``napari -w napari-casam`` worked only because torch
loaded before the viewer's OpenGL context).

CA-SAM does not use Triton (no ``torch.compile``), so when a foreign LLVM is already
mapped, Triton is marked absent before torch can import it; torch then runs without it,
as on any machine where it is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


def foreign_llvm(maps: Optional[str] = None) -> Optional[str]:
    """The path of an LLVM library mapped into this process by something other than Triton, if any."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:  # not Linux: Mesa's llvmpipe clash has not been seen there
            return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        name = Path(path).name.lower()
        if "llvm" in name and "triton" not in path.lower():
            return path
    return None


def avoid_llvm_clash() -> Optional[str]:
    """Mark Triton absent when another LLVM is loaded and Triton is not; returns that LLVM's path when it did."""
    if "triton" in sys.modules:  # loaded already (before the OpenGL driver): nothing can clash any more
        return None
    llvm = foreign_llvm()
    if llvm is not None:
        sys.modules["triton"] = None  # import triton -> ImportError; torch treats it as not installed
    return llvm
