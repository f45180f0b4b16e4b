"""Where CA-SAM keeps things, and the environment variables that move them: one place for
the CLI, the plugin, learning and the benchmarks.

    $CASAM_LIBRARY         the task library           (default ~/.casam/tasks)
    $CASAM_CACHE_DIR       the on-disk embedding cache (default ~/.cache/casam/embeddings)
    $CASAM_CACHE_MAX_GB    its size bound in GB (default 4; least recently used entries go first)
    $CASAM_CHECKPOINT_DIR  where SAM ViT checkpoints are looked for (then ~/.cache/casam/checkpoints)

An explicit path (``--library``, ``--cache-dir``, ``--checkpoint``, a widget argument) wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from .files import PathLike

ENV_LIBRARY = "CASAM_LIBRARY"
ENV_CACHE = "CASAM_CACHE_DIR"
ENV_CHECKPOINTS = "CASAM_CHECKPOINT_DIR"
ENV_CACHE_LIMIT = "CASAM_CACHE_MAX_GB"
DEFAULT_CACHE_GB = 4.0


def _chosen(explicit: Optional[PathLike], env: str, default: Path) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    value = os.environ.get(env)
    return Path(value).expanduser() if value else default


def library_dir(explicit: Optional[PathLike] = None) -> Path:
    """The task library folder."""
    return _chosen(explicit, ENV_LIBRARY, Path.home() / ".casam" / "tasks")


def cache_dir(explicit: Optional[PathLike] = None) -> Path:
    """The on-disk embedding cache folder (shared by the CLI and the viewer)."""
    return _chosen(explicit, ENV_CACHE, Path.home() / ".cache" / "casam" / "embeddings")


def checkpoint_dirs() -> List[Path]:
    """Folders searched, in order, for a SAM ViT checkpoint given by name only."""
    found = [Path(os.environ[ENV_CHECKPOINTS]).expanduser()] if os.environ.get(ENV_CHECKPOINTS) else []
    return found + [Path.home() / ".cache" / "casam" / "checkpoints"]


def child_environment() -> dict:
    """This process's environment for a child Python (the learning process, OpenVINO's first-run
    check), with CA-SAM importable even when it was found through the caller's working folder or
    ``sys.path`` rather than an installation (``casam_core`` and ``napari_casam`` sit side by side)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def cache_limit_bytes(explicit: Optional[float] = None) -> int:
    """The on-disk embedding cache's size bound in bytes (``explicit`` in bytes wins)."""
    if explicit is not None:
        return int(explicit)
    value = os.environ.get(ENV_CACHE_LIMIT)
    if not value:
        return int(DEFAULT_CACHE_GB * 1024**3)
    try:
        gb = float(value)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        from .errors import OptionError

        raise OptionError(f"${ENV_CACHE_LIMIT}={value!r}: give the embedding cache's size bound in GB, e.g. 4")
    return int(gb * 1024**3)
