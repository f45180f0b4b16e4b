"""Choosing the learning recipe: candidate LearnConfigs compared on held-out TRAINING images.

    python benchmarks/learn_recipe.py [--sets hippocampus_mri,covid19_ct_infection,drive_vessels]
                                      [--configs NAME:key=value;key=value,...] [--out ...]

For each set, ``gain_data.training_data`` draws the 40 annotated training images or slices a
clinician would give; ``learn_task`` holds 20 % of them out (evenly spaced) and every config
is scored there: frozen vs learned Dice from GT boxes, the held-out curve during training,
and one-click Dice. The test split is never read. Embeddings are computed once per set and
shared by every config. Results are kept per (set, config) in the JSON file, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path


from _common import REPO, machine  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.training import LearnConfig, learn_task  # noqa: E402
from gain_data import training_data  # noqa: E402

DEFAULT_CONFIGS = ",".join([
    "residual-1e-3:form=residual;lr=1e-3",
    "residual-3e-4:form=residual;lr=3e-4",
    "residual-3e-3:form=residual;lr=3e-3",
    "gated-1e-3:form=gated;lr=1e-3",
    "paper-1e-4:form=paper;lr=1e-4",
])


def parse_configs(text: str) -> dict:
    out = {}
    for item in text.split(","):
        name, _, body = item.partition(":")
        kw = {}
        for pair in filter(None, body.split(";")):
            key, _, value = pair.partition("=")
            default = getattr(LearnConfig, key)
            if value == "none":
                kw[key] = None
            elif isinstance(default, (int, float, str)) and not isinstance(default, bool):
                kw[key] = type(default)(float(value) if isinstance(default, int) and "e" in value else value)
            else:
                raise SystemExit(f"--configs: cannot set {key}")
        out[name] = kw
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="hippocampus_mri,covid19_ct_infection,drive_vessels")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--budget-steps", type=int, default=LearnConfig.steps,
                    help="the same step budget for every config (time budget off, so configs compare fairly)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"), help="disk cache of the embeddings")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "learn_recipe.json"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "learn_recipe.md"))
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the JSON file; compute nothing")
    args = ap.parse_args()
    configs = parse_configs(args.configs)
    results = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    if args.table_only:
        write_table(results, configs, args)
        return
    predictor = CASamPredictor(build_backbone("litemedsam", device=args.device), memory_bytes=2 * 1024**3,
                               disk_cache=args.cache)
    for name in args.sets.split(","):
        todo = [c for c in configs if f"{name}/{c}" not in results]
        if not todo:
            continue
        data = training_data(name)
        t0 = time.perf_counter()
        for s in data.slices:
            predictor.embed_rgb(s.rgb)
        print(f"{name}: {len(data.slices)} slices embedded in {time.perf_counter() - t0:.0f} s", flush=True)
        for cname in todo:
            kw = dict(configs[cname])
            kw.setdefault("steps", args.budget_steps)
            kw.setdefault("time_budget_s", None)
            config = LearnConfig(**kw)
            task = learn_task(predictor, "recipe", data, config)
            c = task.card
            results[f"{name}/{cname}"] = {
                "set": name, "config": cname, "overrides": configs[cname],
                "steps": c["training"]["steps"], "kept_step": c["training"]["kept_step"],
                "train_s": c["seconds"]["training"], "val_images": c["validation"]["images"],
                "frozen": c["validation"]["dice_zero_shot"], "aligned": c["validation"]["dice_aligned"],
                "history": c["validation"]["history"], "point": c["validation"]["point_dice"],
            }
            print(json.dumps(results[f"{name}/{cname}"]), flush=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    write_table(results, configs, args)


def write_table(results: dict, configs: dict, args) -> None:
    sets = [s for s in args.sets.split(",")]
    lines = ["# Choosing the learning recipe (held-out training images; the test split is not read)", "",
             f"Machine: {machine()}. Run: `python benchmarks/learn_recipe.py` on {date.today().isoformat()}; "
             f"{args.budget_steps} steps of 1 image x 5 masks unless the config says otherwise.", "",
             "Each cell: held-out box Dice of the kept layer (best held-out check) minus frozen; "
             "in brackets the gain of the last step's layer.", "",
             "| config | " + " | ".join(sets) + " | mean gain | train s (mean) |",
             "|---|" + "---:|" * (len(sets) + 2)]
    for cname in configs:
        cells, gains, secs = [], [], []
        for s in sets:
            r = results.get(f"{s}/{cname}")
            if r is None:
                cells.append("")
                continue
            last = r["history"][-1][1] if r["history"] else r["aligned"]
            gain = r["aligned"] - r["frozen"]
            gains.append(gain)
            secs.append(r["train_s"])
            cells.append(f"{gain:+.3f} ({last - r['history'][0][1]:+.3f})" if r["history"] else f"{gain:+.3f}")
        mean = f"{sum(gains) / len(gains):+.3f}" if gains else ""
        lines.append(f"| {cname} | " + " | ".join(cells) + f" | {mean} | {sum(secs) / max(1, len(secs)):.0f} |")
    lines += ["", "Frozen held-out box Dice: " + ", ".join(
        f"{s} {next((r['frozen'] for k, r in results.items() if r['set'] == s), float('nan')):.3f}" for s in sets), ""]
    lines += ["One click per held-out object (a subset of at most 16 per image), Dice: frozen (LiteMedSAM's box "
              "search) and the learned layer decoding the click as a box of the task's typical size (`click_box`), "
              "as a point (`direct`) or through the box search (`default`); box = the kept layer's box Dice. "
              "Runs before the click box existed have no `click_box` value.", "",
              "| set / config | box | frozen click | click_box | direct | default |", "|---|---:|---:|---:|---:|---:|"]
    for k, r in results.items():
        p = r["point"]
        cells = [f"{p[key]:.3f}" if key in p else "" for key in
                 ("frozen", "aligned_click_box", "aligned_direct", "aligned_default")]
        lines.append(f"| {k} | {r['aligned']:.3f} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
