"""report.md and PNG plots from a continual run's results (training.continual)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from casam_core.alignment import PAPER, RESIDUAL

LABELS = {"zero_shot": "zero-shot (frozen)", "casam": "CA-SAM routed", "oracle": "CA-SAM oracle",
          "naive_al": "naive sequential AL", "decoder_ft": "sequential decoder FT",
          "decoder_task": "per-task decoder FT + router", "ewc_al": "EWC on shared AL",
          "joint_al": "joint AL (pooled data)"}
TRAINED = ("naive_al", "ewc_al", "decoder_ft", "decoder_task", "variants")  # the learning-time columns


def other_form(form: str) -> str:
    """The layer form the "other_form" ablation trains: the paper's form, or the residual one for a paper run."""
    return RESIDUAL if form == PAPER else PAPER


def matrix(state: dict, method: str, metric: str = "dice") -> np.ndarray:
    """Accuracy matrix (stages x tasks) of one method: ``metric`` after stage t on task i (NaN: not yet)."""
    names = state["stream"]
    a = np.full((len(state["stages"]), len(names)), np.nan)
    for t, row in enumerate(state["stages"]):
        for i, name in enumerate(names):
            r = row["results"].get(method, {}).get(name)
            if r is not None:
                a[t, i] = r[metric]
    return a


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def _budget(p: dict) -> str:
    """Each layer's training budget: the recipe's own, or the profile's overrides."""
    overrides = [f"{k} {p[k]}" for k in ("steps", "epochs", "lr") if p.get(k) is not None]
    return f"recipe `{p.get('recipe', 'paper')}`" + (", " + ", ".join(overrides) if overrides else " (its own budget)")


def _run_time(state: dict) -> str:
    """The run's time: the invocations' wall times summed (a resumed run has several), and the
    stages' own wall times."""
    runs = state.get("invocations", [])
    total = (f"run time {state.get('seconds_total')} s" + (f" over {len(runs)} invocations "
             f"({', '.join(str(round(r['seconds'])) for r in runs)} s)" if len(runs) > 1 else ""))
    stages = [r.get("seconds") for r in state.get("stages", [])]
    if stages and all(v is not None for v in stages):
        return f"{total}; stages {sum(stages):.0f} s in all ({', '.join(f'{v:.0f}' for v in stages)})"
    return total


def write_report(state: dict, out: Path) -> None:
    out = Path(out)
    names = state["stream"]
    s = state.get("summary", {})
    lines = [f"# Continual benchmark: {len(names)} tasks, profile `{state['profile_name']}`"
             if "profile_name" in state else f"# Continual benchmark: {len(names)} tasks", ""]
    p = state["profile"]
    lines += [f"Backbone `{state['backbone']}`. Stream: {', '.join(names)}. Unseen: "
              f"{', '.join(state['unseen']) or 'none'}.",
              f"Per task: {state['data'][names[0]]['train']} training images/slices for {names[0]} "
              f"(caps: {p['train_images']} 2D images, {p['train_volumes']} volumes x {p['slices_per_volume']} "
              f"annotated slices), test caps {p['test_images']} images / {p['test_volumes']} volumes x "
              f"{p.get('test_slices_per_volume') or p['slices_per_volume']} annotated slices; "
              f"{_budget(p)}. Embedding {state.get('embedding_seconds')} s; "
              f"{_run_time(state)}.", ""]
    if state.get("notes"):  # corrections written after the run (e.g. a baseline found invalid)
        lines += ["Notes: " + "; ".join(f"**{k}**: {v}" for k, v in state["notes"].items()) + ".", ""]
    lines += ["## Final results (Dice; after the last task)", "",
              "| method | Avg Dice | forgetting | BWT |", "|---|---:|---:|---:|"]
    for m in state["methods"]:
        r = s.get(m)
        if r:
            lines.append(f"| {LABELS[m]} | {_fmt(r.get('avg_dice'))} | {_fmt(r.get('forgetting'))} | "
                         f"{_fmt(r.get('bwt'))} |")
    lines += ["", f"Routing accuracy on the seen tasks' test images after the last task: "
                  f"**{_fmt(s.get('routing_accuracy_final'))}**.", ""]
    # per task final
    lines += ["## Per task after the last task (Dice)", "",
              "| task | " + " | ".join(LABELS[m] for m in state["methods"]) + " | oracle gain |",
              "|---|" + "---:|" * (len(state["methods"]) + 1)]
    for i, n in enumerate(names):
        row = []
        for m in state["methods"]:
            if m == "joint_al":
                row.append(_fmt(state.get("joint", {}).get("results", {}).get(n, {}).get("dice")))
            else:
                a = matrix(state, m)
                row.append(_fmt(a[-1, i]) if a.size else "-")
        gain = s.get("per_task_gain_oracle", {}).get(n)
        lines.append(f"| {n} | " + " | ".join(row) + f" | {'-' if gain is None else f'{gain:+.3f}'} |")
    # accuracy matrices
    for m in state["methods"]:
        if m == "joint_al":
            continue
        a = matrix(state, m)
        lines += ["", f"### Accuracy matrix, {LABELS[m]} (rows: after stage t; Dice)", "",
                  "| after | " + " | ".join(names) + " | Avg |", "|---|" + "---:|" * (len(names) + 1)]
        for t in range(a.shape[0]):
            lines.append(f"| {t + 1}. {names[t]} | " + " | ".join(_fmt(v) for v in a[t]) +
                         f" | {_fmt(float(np.nanmean(a[t])))} |")
    # the held-out selection: which step each method kept
    if any("kept_step" in row for row in state["stages"]):
        kept = [m for m in ("casam",) + TRAINED if any(m in row.get("kept_step", {}) for row in state["stages"])]
        lines += ["", "## Held-out selection (the step each method kept; 0 = its starting weights)", "",
                  "Every method checks the same held-out images of the task (learn_task's split) every "
                  "`val_every` steps and keeps its best step; a per-task module that kept step 0 is not used "
                  "(the frozen model is).", "",
                  "| stage | task | " + " | ".join(LABELS.get(m, m) for m in kept) + " |",
                  "|---|---|" + "---:|" * len(kept)]
        for row in state["stages"]:
            ks = row.get("kept_step", {})
            lines.append(f"| {row['stage']} | {row['task']} | " + " | ".join(str(ks.get(m, "-")) for m in kept) + " |")
        if "kept_step" in state.get("joint", {}):
            lines += ["", f"Joint layer: kept step {state['joint']['kept_step']} "
                          f"({state['joint'].get('seconds')} s of training and evaluation)."]
            lines += _joint_checks(state["joint"].get("history", []), names)
    # variants
    if p.get("variants", True):
        lines += _variants(state, names, p)
    lines += _tail(state, names)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plots(state, out)


def _joint_checks(history: list, names) -> list:
    """The joint layer's held-out checks, each task's Dice at each step: what one shared layer trades."""
    if not history:
        return []
    lines = ["", "The joint layer's held-out checks (Dice on each task's held-out images; step 0 = frozen):", "",
             "| step | " + " | ".join(names) + " | mean |", "|---:|" + "---:|" * (len(names) + 1)]
    for step, mean, tasks in history:
        lines.append(f"| {step} | " + " | ".join(_fmt(tasks.get(n)) for n in names) + f" | {_fmt(mean)} |")
    return lines


def _variants(state: dict, names, p: dict) -> list:
    lines = ["", "## Alignment Layer variants (CA-SAM oracle, Dice on each task's test set)", "",
              f"Main form: {p['form']}; 'product' applies the held-out check (frozen model when the layer "
              f"loses), the other columns are layers used as trained.", "",
              f"| task | zero-shot | product | layer, no fallback | {other_form(p['form'])} form | 1 block "
              "| + 1 augmented copy |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    last = state["stages"][-1] if state["stages"] else {}
    for n in names:
        v = last.get("oracle_variants", {}).get(n, {})
        z = last.get("results", {}).get("zero_shot", {}).get(n, {})
        lines.append(f"| {n} | {_fmt(z.get('dice'))} | " + " | ".join(
            _fmt(v.get(k, {}).get("dice")) for k in ("product", "layer_no_fallback", "other_form", "1_block",
                                                     "augment_1")) + " |")
    return lines


def _tail(state: dict, names) -> list:
    lines = []
    # unseen, confusion
    fin = state.get("final", {})
    if fin.get("unseen"):
        lines += ["", "## Unseen sets (never learned)", "", "| set | zero-shot Dice | CA-SAM routed Dice |",
                  "|---|---:|---:|"]
        for n, r in fin["unseen"].items():
            lines.append(f"| {n} | {_fmt(r['zero_shot']['dice'])} | {_fmt(r['casam']['dice'])} |")
    if fin.get("confusion"):
        cols = names + ["frozen"]
        lines += ["", "## Routing after the last task (test images: true task x chosen)", "",
                  "| true \\ chosen | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for n, row in fin["confusion"].items():
            lines.append(f"| {n} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
    e = state.get("efficiency", {})
    if e:
        lines += ["", "## Efficiency", "",
                  f"- parameters added per task (CA-SAM: Alignment Layer + VAE): {e['params_per_task_casam']:,}; "
                  f"shared layer baselines: {e['params_shared_al']:,} once; decoder fine-tuning: "
                  f"{e['params_decoder']:,} once, per task with the router {e['params_decoder']:,} + the VAE; "
                  f"1-block layer: {e['params_al_1_block']:,}",
                  f"- GFLOPs per image (FlopCounterMode; 1 GFLOP = 1e9 FLOPs, a multiply-add = 2): encoder "
                  f"{e['gflops_encoder']}, decoder with one box {e['gflops_decoder']}, decoder + Alignment Layer "
                  f"{e['gflops_decoder_with_al']}"]
        lines += ["", "| stage | task | CA-SAM learning s | " + " | ".join(TRAINED) + " |",
                  "|---|---|" + "---:|" * (len(TRAINED) + 1)]
        for row in state["stages"]:
            ts = row["train_seconds"]
            lines.append(f"| {row['stage']} | {row['task']} | {ts.get('casam', '-')} | " + " | ".join(
                str(ts.get(k, "-")) for k in TRAINED) + " |")
    return lines


def plots(state: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = state["stream"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in state["methods"]:
        if m == "joint_al":
            continue
        a = matrix(state, m)
        if a.size:
            ax.plot(range(1, a.shape[0] + 1), [np.nanmean(r) for r in a], marker="o", label=LABELS[m])
    if "joint_al" in state.get("summary", {}):
        ax.scatter([len(names)], [state["summary"]["joint_al"]["avg_dice"]], marker="*", s=150, c="k",
                   label=LABELS["joint_al"], zorder=5)
    ax.set_xlabel("after learning task t")
    ax.set_ylabel("Avg Dice over seen tasks")
    ax.set_xticks(range(1, len(names) + 1))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "avg_dice_by_stage.png", dpi=120)
    plt.close(fig)

    a = matrix(state, "casam")
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(a.shape[0]), [f"after {i + 1}" for i in range(a.shape[0])], fontsize=7)
    for (t, i), v in np.ndenumerate(a):
        if not np.isnan(v):
            ax.text(i, t, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="Dice")
    ax.set_title("CA-SAM routed: accuracy matrix")
    fig.tight_layout()
    fig.savefig(out / "accuracy_matrix.png", dpi=120)
    plt.close(fig)

    conf = state.get("final", {}).get("confusion", {})
    if conf:
        rows = list(conf)
        cols = names + ["frozen"]
        c = np.array([[conf[r].get(k, 0) for k in cols] for r in rows], float)
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.imshow(c / np.maximum(c.sum(1, keepdims=True), 1), vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        for (i, j), v in np.ndenumerate(c):
            if v:
                ax.text(j, i, int(v), ha="center", va="center", fontsize=7)
        ax.set_xlabel("chosen")
        ax.set_ylabel("true task")
        ax.set_title("Routing after the last task")
        fig.tight_layout()
        fig.savefig(out / "routing_confusion.png", dpi=120)
        plt.close(fig)
