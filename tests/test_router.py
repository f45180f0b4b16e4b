"""Router maths (exact sizes, stacked scoring, thresholds, volume rule) and evaluation metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from casam_core.metrics import backward_transfer, boundary_iou, boundary_width, forgetting
from casam_core.router import (Router, TaskVAE, elbo_score, fit_threshold, router_feature, train_vae,
                               vae_scores)


def test_task_vae_has_the_papers_size_and_init():
    vae = TaskVAE()
    assert sum(p.numel() for p in vae.parameters()) == 90_752
    assert all(float(m.bias.abs().sum()) == 0 for m in vae.modules() if isinstance(m, torch.nn.Linear))
    assert vae.mu.out_features == 64 and vae.enc.out_features == 128


def test_router_feature_is_attention_pooling():
    torch.manual_seed(0)
    z = torch.randn(256, 8, 8)
    z[:, 0, 0] *= 50  # one token with a large norm dominates the softmax
    f = router_feature(z)
    norms = z.flatten(1).norm(dim=0) / 256
    a = torch.softmax(norms, 0)
    assert torch.allclose(f, (z.flatten(1) * a).sum(1), atol=1e-5)
    assert torch.allclose(router_feature(z[None])[0], f)
    flat = torch.ones(256, 4, 4)
    assert torch.allclose(router_feature(flat), torch.ones(256))  # equal norms -> plain average


def test_elbo_score_is_reconstruction_plus_beta_kl():
    f = torch.zeros(2, 256)
    recon = torch.ones(2, 256)
    mu, logvar = torch.zeros(2, 64), torch.zeros(2, 64)
    assert torch.allclose(elbo_score(recon, f, mu, logvar), torch.ones(2))  # KL = 0
    mu = torch.ones(2, 64)
    assert torch.allclose(elbo_score(recon, f, mu, logvar, beta=16.5), torch.full((2,), 1 + 16.5 * 32))


def _clusters(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(40, 256, generator=g) * 0.05 + 1.0
    b = torch.randn(40, 256, generator=g) * 0.05 - 1.0
    return a, b


def test_stacked_scores_equal_each_vae_alone_and_route_in_and_out():
    a, b = _clusters()
    router = Router()
    vae_a, vae_b = train_vae(a[:30], seed=1), train_vae(b[:30], seed=2)
    tau_a, tau_b = fit_threshold(a[:30]), fit_threshold(b[:30])
    router.add("a", vae_a, tau_a)
    router.add("b", vae_b, tau_b)
    test = torch.cat([a[30:], b[30:]])
    stacked = router.score(test)
    assert torch.allclose(stacked[:, 0], vae_scores(vae_a, test), rtol=1e-4, atol=1e-5)
    assert torch.allclose(stacked[:, 1], vae_scores(vae_b, test), rtol=1e-4, atol=1e-5)
    decisions = [router.route(f).decision for f in test]
    assert decisions[:10].count("a") >= 9 and decisions[10:].count("b") >= 9
    far = torch.full((1, 256), 10.0)
    assert router.route(far[0]).decision is None and router.route(far[0]).best in ("a", "b")
    assert router.route(a[31]).to_json().keys() == {"decision", "scores", "tau"}
    router.remove("a")
    assert router.names == ["b"] and router.score(test).shape == (20, 1)


def test_threshold_is_deterministic_and_a_high_percentile():
    a, _ = _clusters(1)
    assert fit_threshold(a) == fit_threshold(a)
    vae = train_vae(a)
    assert fit_threshold(a) > float(np.median(vae_scores(vae, a).numpy()))
    with pytest.raises(ValueError, match="at least 2"):
        fit_threshold(a[:1])


def test_scoring_is_deterministic():
    a, _ = _clusters(2)
    vae = train_vae(a)
    assert torch.equal(vae_scores(vae, a), vae_scores(vae, a))


def test_volume_route_uses_the_median_slice_score():
    a, b = _clusters(3)
    router = Router()
    router.add("a", train_vae(a), fit_threshold(a))
    # 7 slices of task a and 3 odd slices from elsewhere: the median still says "a"
    volume = torch.cat([a[:7], torch.full((3, 256), 10.0)])
    decision = router.route_volume(volume)
    assert decision.decision == "a"
    assert len(decision.slice_scores["a"]) == 10
    assert router.route_volume(torch.full((5, 256), 10.0)).decision is None


def test_empty_router_sends_everything_to_frozen():
    router = Router()
    assert router.route(torch.zeros(256)).decision is None
    assert router.score(torch.zeros(3, 256)).shape == (3, 0)


def test_boundary_iou_on_hand_made_masks():
    gt = np.zeros((100, 100), bool)
    gt[20:80, 20:80] = True
    assert boundary_width(gt.shape) == 3  # round(0.02 * 141.4) = 3
    assert boundary_iou(gt, gt) == 1.0
    assert boundary_iou(np.zeros_like(gt), gt) == 0.0
    shifted = np.roll(gt, 10, axis=1)
    assert 0.0 < boundary_iou(shifted, gt) < 0.6
    # a filled square and its 2-pixel-thinner copy: region IoU high, boundary IoU lower
    inner = np.zeros_like(gt)
    inner[22:78, 22:78] = True
    assert boundary_iou(inner, gt) < (inner & gt).sum() / (inner | gt).sum()
    assert boundary_iou(np.zeros_like(gt), np.zeros_like(gt)) == 1.0


def test_forgetting_and_bwt_on_a_hand_made_matrix():
    # rows = after stage t, columns = task i (NaN = not seen yet)
    a = np.array([[0.8, np.nan, np.nan],
                  [0.6, 0.9, np.nan],
                  [0.5, 0.7, 0.95]])
    assert forgetting(a) == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)
    assert backward_transfer(a) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert forgetting(a[:1, :1]) == 0.0
    no_forgetting = np.array([[0.8, np.nan], [0.8, 0.9]])
    assert forgetting(no_forgetting) == 0.0 and backward_transfer(no_forgetting) == 0.0


def test_each_slice_of_a_routed_volume_has_its_own_route():
    """The plugin's route strip: per slice, the task whose score is under its tau (the nearest by
    score / tau), else the frozen model."""
    from casam_core.tasks import TaskChoice, slice_route

    choice = TaskChoice("auto", "a", "a", {"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 4.0},
                        slice_scores={"a": [1.0, 3.0, 9.0], "b": [8.0, 2.0, 8.0]})
    assert slice_route(choice, 0) == ("a", 0.5)
    assert slice_route(choice, 1) == ("b", 0.5)  # 2/4 beats 3/2
    assert slice_route(choice, 2) == (None, 2.0)  # no task recognises it: 8/4 is the nearest
    assert slice_route(TaskChoice("auto"), 0) == (None, None)
