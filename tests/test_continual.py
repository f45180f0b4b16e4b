"""A miniature continual run: two tiny real tasks, one epoch, every method and every output file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, dataset_root


def test_miniature_run_writes_every_output_and_resumes(tmp_path, embedding_cache):
    from training.continual import METHODS, Profile, run
    from training.report import matrix

    for name in ("kvasir_polyp", "hippocampus_mri", "cxr_lungs"):
        dataset_root(name)  # skips without the data
    # the product's recipe cut to 4 steps: every method checks its held-out images at steps 0 and 4
    profile = Profile(train_images=3, test_images=1, train_volumes=1, test_volumes=1, slices_per_volume=2,
                      background_per_volume=1, max_objects=4, steps=4, form="gated", lr=1e-3, recipe="fast")
    out = tmp_path / "run"
    logs = []
    run(["kvasir_polyp", "hippocampus_mri"], ["cxr_lungs"], profile, out, DATA, "cpu",
                embedding_cache, log=logs.append)
    for f in ("results.json", "report.md", "avg_dice_by_stage.png", "accuracy_matrix.png", "routing_confusion.png",
              "models/stage_1.safetensors", "models/stage_2.safetensors"):
        assert (out / f).is_file(), f
    results = json.loads((out / "results.json").read_text())
    assert len(results["stages"]) == 2 and set(results["methods"]) == set(METHODS)
    for m in METHODS:
        if m == "joint_al":
            assert set(results["joint"]["results"]) == {"kvasir_polyp", "hippocampus_mri"}
            continue
        a = matrix(results, m)
        assert a.shape == (2, 2) and np.isnan(a[0, 1]) and not np.isnan(a[1]).any(), m
        assert ((a[~np.isnan(a)] >= 0) & (a[~np.isnan(a)] <= 1)).all()
    # the zero-shot row does not change; the oracle's first task does not change either (its layer is frozen)
    z, o = matrix(results, "zero_shot"), matrix(results, "oracle")
    assert z[0, 0] == z[1, 0] and o[0, 0] == o[1, 0]
    assert set(results["summary"]) >= {"casam", "oracle", "naive_al", "routing_accuracy_final"}
    assert 0 <= results["summary"]["routing_accuracy_final"] <= 1
    assert set(results["final"]["unseen"]) == {"cxr_lungs"}
    conf = results["final"]["confusion"]
    assert sum(conf["kvasir_polyp"].values()) == 1 and set(conf) == {"kvasir_polyp", "hippocampus_mri", "cxr_lungs"}
    assert set(results["stages"][1]["oracle_variants"]["kvasir_polyp"]) == {
        "product", "layer_no_fallback", "other_form", "1_block", "augment_1"}
    assert results["efficiency"]["params_per_task_casam"] == 3_541_263 + 90_752  # gated layer + VAE
    # every baseline kept the best of its held-out checks, as CA-SAM does: its starting weights (step 0)
    # or the trained ones (step 4); a per-task decoder that never beat the frozen one is not kept
    for row in results["stages"]:
        assert set(row["kept_step"]) == {"casam", "naive_al", "ewc_al", "decoder_ft", "decoder_task"}, row
        assert set(row["kept_step"].values()) <= {0, 4}, row["kept_step"]
    assert results["joint"]["kept_step"] in (0, 8)  # the joint layer: the budget of both tasks
    checks = results["joint"]["history"]  # each check scores each task's held-out images
    assert [c[0] for c in checks][:1] == [0] and results["joint"]["kept_step"] in [c[0] for c in checks]
    for _, mean, tasks in checks:
        assert set(tasks) == {"kvasir_polyp", "hippocampus_mri"} and mean == pytest.approx(
            np.mean(list(tasks.values())), abs=1e-3)
    models = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "models/stage_2.safetensors"))
    for row in results["stages"]:
        has = any(k.startswith(f"dtask.{row['task']}.") for k in models)
        assert has == (row["kept_step"]["decoder_task"] != 0), row
    report = (out / "report.md").read_text()
    assert "Held-out selection" in report and "per-task decoder FT + router" in report
    assert "The joint layer's held-out checks" in report
    assert "Accuracy matrix, CA-SAM routed" in report and "Routing after the last task" in report

    # a second run on the same folder resumes from the saved models: same results, no retraining
    again = run(["kvasir_polyp", "hippocampus_mri"], ["cxr_lungs"], profile, out, DATA, "cpu", embedding_cache,
                log=logs.append)
    assert any(line.startswith("resuming after stage 2") for line in logs)
    assert again["final"]["confusion"] == results["final"]["confusion"]
    assert again["final"]["unseen"] == results["final"]["unseen"]
    # the run time is summed over both invocations (the resumed one did not retrain the stages)
    first, second = again["invocations"]
    assert results["invocations"] == [first] and first["resumed_after_stage"] == 0 and second["resumed_after_stage"] == 2
    assert results["seconds_total"] == first["seconds"] > 0 and 0 < second["seconds"] < first["seconds"]
    assert again["seconds_total"] == round(first["seconds"] + second["seconds"], 1)
    assert "over 2 invocations" in (out / "report.md").read_text()
