"""The fault report (issue 13, part 6): every case tried, with its outcome.

    python benchmarks/faults.py [--out benchmarks/results/faults.md] [--skip-kills]

1. Every case of ``tests/fault_cases.py`` (bad inputs and hostile task packs), run through the
   CLI in a fresh workspace: exit code, lines on stderr, the message, and whether anything
   was written.
2. ``tests/test_faults.py`` (kills at seeded random instants, and concurrent writers), run
   under pytest with ``$CASAM_FAULTS_LOG`` so that every kill is listed with what was found
   after it.
3. The classes issue 30 added (``tests/test_nothing_lost.py``, ``tests/test_privacy.py``): a full
   disk (a 40 MB tmpfs), signals, tampered library entries, the network, files, a crash inside
   OpenVINO; each test listed with its outcome.
The same cases run in CI (``make test``); this script writes them down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO  # noqa: E402
sys.path.insert(0, str(REPO / "tests"))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def run_catalogue(tmp: Path):
    import warnings

    from fault_cases import CASES, make_workspace, run_case

    warnings.simplefilter("ignore")
    os.environ["CASAM_LIBRARY"] = str(tmp / "default-library")
    ws = make_workspace(tmp / "ws")
    return [run_case(case, ws) for case in CASES]


def run_kills(tmp: Path):
    log = tmp / "kills.jsonl"
    env = dict(os.environ, CASAM_FAULTS_LOG=str(log))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode != 0:  # say which check failed
        failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "E  "))][:6]
        summary += ": " + " / ".join(failed)
    return rows, proc.returncode, summary, time.monotonic() - t0


CLASSES = (("disk full", ("disk", "cache_on_a_full")), ("signals", ("sigterm", "ctrl_c")),
           ("tampered library entries", ("tampered", "symbolic_link", "newline", "read_only")),
           ("network and $HOME", ("socket",)), ("a crash inside OpenVINO", ("crash_in_openvino",)))


def run_classes(tmp: Path):
    """The issue-30 tests under pytest, one row per test: (class, test, outcome, seconds)."""
    import xml.etree.ElementTree as ET

    report = tmp / "classes.xml"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           "tests/test_nothing_lost.py", "tests/test_privacy.py"], cwd=REPO, capture_output=True,
                          text=True)
    rows = []
    for case in ET.parse(report).iter("testcase") if report.exists() else ():
        name = case.get("name")
        kind = next((k for k, keys in CLASSES if any(key in name for key in keys)), "files and clicks")
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        rows.append({"class": kind, "test": name, "outcome": "FAILED" if failed else "skipped" if skipped
                     else "passed", "seconds": float(case.get("time", 0))})
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return rows, proc.returncode, summary, time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "faults.md"))
    ap.add_argument("--skip-kills", action="store_true", help="only the catalogue (minutes less)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = run_catalogue(tmp)
        kills, rc, summary, seconds = ([], None, "not run (--skip-kills)", 0.0) if args.skip_kills \
            else run_kills(tmp)
        classes, rc30, summary30, seconds30 = run_classes(tmp)
    inputs = [r for r in rows if r["group"] == "input"]
    packs = [r for r in rows if r["group"] == "pack"]
    kill_rows = [k for k in kills if k["kind"] == "kill"]
    conc_rows = [k for k in kills if k["kind"] == "concurrency"]
    ok = lambda rs: sum(r["passed"] for r in rs)  # noqa: E731
    lines = [
        "# Fault report (`benchmarks/faults.py`)", "",
        f"{time.strftime('%Y-%m-%d')}. The rule for a bad input or a hostile pack: exit code 2, one line on "
        "stderr that names the file and the problem, nothing written (workspace and task library "
        "byte-identical). After a kill: the library lists and loads, no partial or duplicate task, "
        "the embedding cache holds no damaged entry, the mask file is whole or absent, and the "
        "next writer clears what the killed one left.", "",
        "| | tried | passed |", "|---|---:|---:|",
        f"| bad inputs | {len(inputs)} | {ok(inputs)} |",
        f"| hostile or damaged task packs | {len(packs)} | {ok(packs)} |",
        f"| kills (SIGKILL at seeded random instants) | {len(kill_rows)} | {len(kill_rows) if rc == 0 else '-'} |",
        f"| concurrent writers | {len(conc_rows)} | {len(conc_rows) if rc == 0 else '-'} |",
    ]
    for kind in dict.fromkeys(r["class"] for r in classes):
        mine = [r for r in classes if r["class"] == kind]
        lines.append(f"| {kind} (issue 30) | {len(mine)} | {sum(r['outcome'] == 'passed' for r in mine)} |")
    lines += [
        "",
        f"Kills and concurrency: `pytest tests/test_faults.py` exit code {rc}, {summary} ({seconds:.0f} s).", "",
    ]
    for title, group in (("Bad inputs", inputs), ("Hostile or damaged task packs", packs)):
        lines += [f"## {title}", "", "| case | exit code | lines | nothing written | outcome | message |",
                  "|---|---:|---:|---|---|---|"]
        for r in group:
            message = r["message"].split(": error: ", 1)[-1]
            lines.append(f"| {_cell(r['case'])} | {r['rc']} | {r['lines']} | {'yes' if r['unchanged'] else 'NO'} "
                         f"| {'passed' if r['passed'] else 'FAILED'} | {_cell(message[:160])} |")
        lines.append("")
    lines += ["## Kills", "", "| # | command | killed at | was running | found after the kill |",
              "|---:|---|---:|---|---|"]
    for i, k in enumerate(kill_rows, 1):
        lines.append(f"| {i} | {_cell(k['command'])} | {k['at_s']:.2f} s | {'yes' if k['killed'] else 'had ended'} "
                     f"| {_cell(k['after'])} |")
    lines += ["", "## Concurrent writers", "", "| case | outcome |", "|---|---|"]
    lines += [f"| {_cell(k['command'])} | {_cell(k['after'])} |" for k in conc_rows]
    lines += ["", "## Full disks, signals, tampered entries, the network (issue 30)", "",
              f"`pytest tests/test_nothing_lost.py tests/test_privacy.py` exit code {rc30}, {summary30} "
              f"({seconds30:.0f} s).", "", "| class | test | outcome | seconds |", "|---|---|---|---:|"]
    lines += [f"| {r['class']} | {_cell(r['test'])} | {r['outcome']} | {r['seconds']:.1f} |" for r in classes]
    lines.append("")
    out = Path(args.out)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"catalogue": rows, "kills": kills, "pytest_rc": rc,
                                                    "issue30": classes, "issue30_rc": rc30}, indent=1) + "\n")
    print("\n".join(lines[:20]))
    return 0 if all(r["passed"] for r in rows) and rc in (0, None) and rc30 == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
