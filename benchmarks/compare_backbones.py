"""LiteMedSAM vs MobileSAM, set by set, from the two learn_gain runs (issue 32).

    python benchmarks/learn_gain.py                        # LiteMedSAM  -> results/learn_gain/
    python benchmarks/learn_gain.py --backbone mobilesam   # MobileSAM   -> results/learn_gain_mobilesam/
    python benchmarks/compare_backbones.py                 # -> results/backbones_cpu.md

Both runs use the same protocol (learn_gain's docstring): the product's default recipe, at most
40 annotated training images, the test split, GT boxes and ONE click per object at its pixel
nearest the centroid (no box). Only sets present in both runs are compared. A 3D set may have been
scored on fewer test volumes in one run (``--max-test-volumes``): the table names the images each
run scored.
"""

from __future__ import annotations

import json

from _common import REPO  # noqa: E402

from learn_gain import ALL  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BACKBONES = {"litemedsam": RESULTS / "learn_gain", "mobilesam": RESULTS / "learn_gain_mobilesam"}


def load() -> dict:
    return {b: {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} for b, folder in BACKBONES.items()}


def _d(r: dict, key: str) -> float:
    return r["scores"][key]["dice"]


def table(runs: dict) -> str:
    lite, mobile = runs["litemedsam"], runs["mobilesam"]
    names = [n for n in ALL if n in lite and n in mobile]
    lines = ["# Backbones: LiteMedSAM vs MobileSAM (issue 32)", "",
             "From `benchmarks/learn_gain.py` run once per backbone (same protocol, same CPU); "
             "`python benchmarks/compare_backbones.py`. Dice on the test splits; L = LiteMedSAM, M = MobileSAM. "
             "Embedding s = the cold embedding time of learning divided by the images embedded.", "",
             "| set | test images L | M | box frozen L | M | box learned L | M | click frozen L | M | click learned L | M "
             "| click/box learned L | M | embed s / image L | M |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        a, b = lite[n], mobile[n]
        cells = [str(a["test"]["images"]), str(b["test"]["images"])]
        for key in ("frozen_box", "learned_box", "frozen_point", "learned_point"):
            cells += [f"{_d(a, key):.3f}", f"{_d(b, key):.3f}"]
        ratio = [_d(r, "learned_point") / _d(r, "learned_box") for r in (a, b)]
        embed = [r["learn_seconds"]["embedding"] / max(1, r["train"]["annotated"]) for r in (a, b)]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {ratio[0]:.2f} | {ratio[1]:.2f} | "
                     f"{embed[0]:.2f} | {embed[1]:.2f} |")
    if names:
        lines += ["", "Counts over the sets compared:", ""]
        for label, r in (("LiteMedSAM", lite), ("MobileSAM", mobile)):
            ok = [n for n in names if _d(r[n], "learned_point") >= 0.9 * _d(r[n], "learned_box")]
            lines.append(f"- {label}: one click >= 0.9 x its own box (learned) on {len(ok)} of {len(names)} "
                         f"({', '.join(ok) or 'none'})")
        best_box = max((lite, mobile), key=lambda r: sum(_d(r[n], "learned_box") for n in names))
        ok = [n for n in names if _d(mobile[n], "learned_point") >= 0.9 * _d(best_box[n], "learned_box")]
        lines.append(f"- MobileSAM's click >= 0.9 x the better backbone's learned box (by mean) on {len(ok)} "
                     f"of {len(names)} ({', '.join(ok) or 'none'})")
        for key, what in (("learned_box", "learned box"), ("learned_point", "learned click")):
            wins = [n for n in names if _d(mobile[n], key) > _d(lite[n], key)]
            mean = sum(_d(mobile[n], key) - _d(lite[n], key) for n in names) / len(names)
            lines.append(f"- {what}: MobileSAM ahead on {len(wins)} of {len(names)}, mean difference "
                         f"{100 * mean:+.1f} Dice points (M - L)")
    return "\n".join(lines) + "\n"


def main() -> None:
    text = table(load())
    (RESULTS / "backbones_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
