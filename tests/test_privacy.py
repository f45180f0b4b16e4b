"""Nothing leaked (issue 30): a run opens no socket, forks no helper process, and writes nothing
outside the folders it was given (OpenVINO's telemetry wrote ~/intel and forked a process that
sent a usage event on every run; converted models went to $HOME whatever --cache-dir said)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HC18 = ROOT / "samples" / "hc18_fetal_head" / "006_HC.png"

# runs casam in a child under an audit hook; prints the network and fork events it saw as JSON
_PROBE = r"""
import json, sys
seen = []
NET = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto",
       "socket.bind")
def hook(event, args):
    if event in NET or event == "os.fork" or (event == "socket.__new__" and args[1] in (2, 10)):  # AF_INET(6)
        seen.append([event, repr(args)[:120]])
sys.addaudithook(hook)
from casam_core.cli import main
code = main(sys.argv[1:])
print("EVENTS " + json.dumps(seen))
sys.exit(code)
"""


def _run(tmp_path: Path, *argv) -> tuple:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASAM_", "XDG_"))}
    env.update(HOME=str(home), CASAM_LIBRARY=str(tmp_path / "library"), PYTHONPATH=str(ROOT))
    env.pop("CI", None)  # OpenVINO's telemetry stays quiet in CI jobs: the check must not depend on that
    proc = subprocess.run([sys.executable, "-c", _PROBE, *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)
    events = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("EVENTS ")]
    return proc, events[0] if events else None, home


def test_a_run_opens_no_socket_forks_nothing_and_keeps_to_its_cache_folder(tmp_path):
    """segment with the OpenVINO runtime (converting the graphs in a fresh cache, where the telemetry
    fired) and --cache-dir: no network event, no fork, $HOME untouched, the converted graphs in the cache."""
    pytest.importorskip("openvino")
    cache = tmp_path / "cache"
    proc, events, home = _run(tmp_path, "segment", HC18, "--box", "100,100,400,400", "--out", tmp_path / "m.png",
                              "--task", "none", "--device", "cpu", "--runtime", "openvino", "--cache-dir", cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert events == [], events  # no socket, no DNS look-up, no forked sender
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []  # nothing in $HOME (~/intel, ~/.cache)
    assert list((cache / "encoders").glob("*.xml")), sorted(p.name for p in cache.rglob("*"))
    assert (tmp_path / "m.png").stat().st_size > 0
