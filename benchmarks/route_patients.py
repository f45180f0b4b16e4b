"""Does a task learned from ONE annotated volume recognise the next patient? (issue 31)

    python benchmarks/route_patients.py features   # embed once: router features of every case
    python benchmarks/route_patients.py table      # the routing table from those features

``features`` embeds (through a disk cache, ``--cache``) and keeps the router feature of every
slice or image it needs in ``runs/route_patients/<set>/<case>.npy``:
- the 3D sets (hippocampus_mri, brats_glioma): training volumes (the ones a task is learned
  from, and the validation volumes the threshold rule was chosen on) and test volumes;
- the 2D sets: training and test images, the "foreign" images a 3D task must NOT take.

``table`` learns each 3D set's router the way ``learn_task`` does (the VAE on every slice of
the volume; the threshold by ``router.fit_threshold``), from each of the first training
volumes in turn, and counts, for the old and the new threshold rule:
- the other volumes of the same set routed to the task (one decision per volume, as
  ``route_volume``): the validation volumes (train split) and the test volumes;
- the foreign images and volumes sent to the frozen model (each 2D image alone; each
  volume of the other 3D set as one decision).
The rule's constants were chosen on the validation volumes and training images only.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np

from _common import DATA, REPO, machine  # noqa: E402


OUT = REPO / "runs" / "route_patients"
VOLUME_SETS = {"hippocampus_mri": (8, 26), "brats_glioma": (5, 1)}  # (training volumes, test volumes) embedded
FLAT_SETS = ["kvasir_polyp", "cxr_lungs", "hc18_fetal_head", "skin_lesion", "covid19_ct_infection",
             "monuseg_nuclei", "drive_vessels", "em_membranes"]
FLAT_PER_SPLIT = {"train": 10, "test": 20}


def _even(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, n).round().astype(int)]


def cases(name: str):
    """(split, case) pairs whose features are kept, in the order they are embedded."""
    from casam_core.datasets import read_dataset

    ds = read_dataset(DATA / name)
    if name in VOLUME_SETS:
        n_train, n_test = VOLUME_SETS[name]
        return [("train", c) for c in ds.cases("train")[:n_train]] + [("test", c) for c in
                                                                     _even(ds.cases("test"), n_test)]
    return [(split, c) for split in ("train", "test") for c in _even(ds.cases(split), FLAT_PER_SPLIT[split])]


def features(args) -> None:
    import torch

    from casam_core import CASamPredictor, build_backbone
    from casam_core.io import read_image

    torch.set_num_threads(args.threads)
    predictor = CASamPredictor(build_backbone(device="cpu"), disk_cache=args.cache)
    for name in FLAT_SETS + list(VOLUME_SETS):
        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, case in cases(name):
            target = folder / f"{split}-{Path(case.image).name.split('.')[0]}.npy"
            if target.exists():
                continue
            image = read_image(case.image)
            if image.is_volume:
                predictor.set_volume(image.array, axis=0)
                records = predictor.embed_slices()
                f = torch.stack([predictor.router_feature(r) for r in records])
            else:
                f = predictor.router_feature(predictor.set_image(image.array))[None]
            np.save(target.with_suffix(".tmp.npy"), f.numpy())
            target.with_suffix(".tmp.npy").rename(target)
            print(f"{name} {target.name}: {tuple(f.shape)}", flush=True)


def load(name: str, split: str):
    import torch

    return {p.stem.split("-", 1)[1]: torch.from_numpy(np.load(p)) for p in sorted((OUT / name).glob(f"{split}-*.npy"))
            if not p.name.endswith(".tmp.npy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=["features", "table"])
    parser.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "route_patients_cpu.md"))
    args = parser.parse_args()
    if args.phase == "features":
        features(args)
    else:
        table(args)


def _router(features, groups, rule: str):
    from casam_core.router import Router, fit_threshold, train_vae

    f = features.float()
    router = Router()
    router.add("task", train_vae(f, seed=0), fit_threshold(f, groups=groups if rule == "new" else None))
    return router


def _in(router, f) -> bool:
    """Routed to the task: a volume by its median slice score (``route_volume``), an image alone."""
    return (router.route_volume(f) if f.shape[0] > 1 else router.route(f[0])).decision is not None


def table(args) -> None:
    import torch

    flat = {name: {split: load(name, split) for split in ("train", "test")} for name in FLAT_SETS}
    rows = []
    for name, (n_train, _) in VOLUME_SETS.items():
        train, test = load(name, "train"), load(name, "test")
        other = [n for n in VOLUME_SETS if n != name]
        foreign_volumes = [f for o in other for split in ("train", "test") for f in load(o, split).values()]
        foreign_test = [f for d in flat.values() for f in d["test"].values()]
        names = list(train)
        setups = [(f"1 volume ({n})", [n]) for n in names[:4]] + [("2 volumes", names[:2]), ("4 volumes", names[:4])]
        for label, chosen in setups:
            if len(chosen) > len(names) - 1:
                continue
            features = torch.cat([train[n] for n in chosen])
            groups = [n for n in chosen for _ in range(train[n].shape[0])]
            for rule in ("old", "new"):
                router = _router(features, groups, rule)
                val = [_in(router, train[n]) for n in names if n not in chosen]
                rows.append({"set": name, "learned from": label, "rule": rule,
                             "tau": router.taus["task"],
                             "validation volumes in": f"{sum(val)}/{len(val)}",
                             "test volumes in": f"{sum(_in(router, f) for f in test.values())}/{len(test)}",
                             "foreign 2D test images out": _share([not _in(router, f) for f in foreign_test]),
                             "foreign volumes out": _share([not _in(router, f) for f in foreign_volumes])})
            print(rows[-2], rows[-1], sep="\n", flush=True)
    lines = [f"# Routing the next patient (issue 31), {machine()}", "",
             f"Run: `python benchmarks/route_patients.py table` on {date.today()} (features from `features`; "
             f"LiteMedSAM, {len(foreign_test)} foreign 2D test images from {len(FLAT_SETS)} sets). A task's router "
             "is learned as `learn_task` learns it, from every slice of the volumes named; a volume is routed "
             "by its median slice score (`route_volume`). Old rule: tau from 5 random folds of the slices. New "
             "rule: folds by volume (patient); from one volume, 3 contiguous slabs (`router.SLABS`, chosen on "
             "the validation volumes of the hippocampus train split). Validation volumes: the rest of the "
             "train split embedded here; test volumes: the test split (evenly spaced).", "",
             "| set | learned from | rule | tau | validation volumes in | test volumes in | foreign 2D test images "
             "out | foreign volumes out |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['learned from']} | {r['rule']} | {r['tau']:.4g} | "
                     f"{r['validation volumes in']} | {r['test volumes in']} | {r['foreign 2D test images out']} | "
                     f"{r['foreign volumes out']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def _share(flags) -> str:
    return f"{sum(flags)}/{len(flags)} ({100 * sum(flags) / max(1, len(flags)):.0f} %)"


if __name__ == "__main__":
    main()
