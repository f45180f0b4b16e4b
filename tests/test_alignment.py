import pytest
import torch

from casam_core.alignment import AlignmentLayer, CAResBlock, count_parameters


def test_paper_layer_has_the_papers_parameter_count():
    assert count_parameters(AlignmentLayer()) == 3_541_007
    # one block: two 3x3 convs with bias + the ECA conv (5 weights) + the shared norm
    assert count_parameters(AlignmentLayer(n_blocks=1)) == 2 * (256 * 256 * 9 + 256) + 5 + 512


def test_gated_form_adds_one_gate_per_channel():
    assert count_parameters(AlignmentLayer(form="gated")) == 3_541_007 + 256


def test_one_layernorm_is_shared_by_every_block():
    layer = AlignmentLayer()
    norms = [m for m in layer.modules() if type(m).__name__ == "LayerNorm2d"]
    assert len(norms) == 1 and norms[0].eps == 1e-6


def test_eca_is_a_kernel_5_conv_without_bias():
    eca = CAResBlock().eca.conv
    assert eca.kernel_size == (5,) and eca.padding == (2,) and eca.bias is None
    assert eca.in_channels == eca.out_channels == 1


def test_gated_layer_at_zero_is_exactly_the_identity():
    torch.manual_seed(0)
    layer = AlignmentLayer(form="gated").eval()
    z = torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        assert torch.equal(layer(z), z)
        layer.gate.fill_(0.5)
        assert not torch.equal(layer(z), z)


def test_paper_layer_changes_features_and_keeps_shape():
    torch.manual_seed(0)
    layer = AlignmentLayer().eval()
    z = torch.randn(1, 256, 64, 64)
    with torch.no_grad():
        out = layer(z)
    assert out.shape == z.shape
    assert (out - z).abs().mean() > 0.1
    # every block ends in the shared LayerNorm: unit variance across channels
    assert torch.allclose(out.var(dim=1, unbiased=False).mean(), torch.tensor(1.0), atol=1e-3)


def test_gated_layer_at_zero_trains_only_its_gate_at_first():
    # d/dtheta of g * A(Z) is g * dA/dtheta: with g = 0 the convolutions get exactly zero gradient
    layer = AlignmentLayer(form="gated")
    z = torch.randn(1, 256, 16, 16)
    layer(z).square().mean().backward()
    assert layer.gate.grad is not None and layer.gate.grad.abs().sum() > 0
    for block in layer.blocks:
        assert torch.count_nonzero(block.conv1.weight.grad) == 0
        assert torch.count_nonzero(block.conv2.weight.grad) == 0


def test_residual_layer_starts_at_identity_and_every_weight_learns_from_step_1():
    torch.manual_seed(0)
    layer = AlignmentLayer(form="residual")
    assert count_parameters(layer) == 3_541_007  # the paper's parameters, started differently
    z = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        assert torch.equal(layer(z), z)
    target = torch.randn_like(z)
    (layer(z) - target).square().mean().backward()
    for block in layer.blocks:  # step 0: the last convolution of each block gets a gradient
        assert block.conv2.weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        assert not torch.equal(layer(z), z)
    (layer(z) - target).square().mean().backward()
    for name, p in layer.named_parameters():  # step 1: every weight, the norm and ECA included
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_round_trip_and_bad_form():
    layer = AlignmentLayer(n_blocks=2, form="gated")
    again = AlignmentLayer.from_config(layer.config())
    assert again.config() == {"channels": 256, "n_blocks": 2, "form": "gated"}
    with pytest.raises(ValueError, match="unknown Alignment Layer form"):
        AlignmentLayer(form="identity")


def _moved_layer(seed: int = 0) -> AlignmentLayer:
    """A residual layer away from the identity, as a learned one is (its last convolutions non-zero)."""
    torch.manual_seed(seed)
    layer = AlignmentLayer(form="residual").eval()
    for block in layer.blocks:
        torch.nn.init.normal_(block.conv2.weight, std=0.01)
    return layer


def test_run_layer_in_bfloat16_is_close_to_float32_and_gives_float32():
    from casam_core.alignment import run_layer

    layer = _moved_layer()
    z = torch.randn(1, 256, 32, 32)
    with torch.inference_mode():
        exact = layer(z)
        assert torch.equal(run_layer(layer, z), exact)  # no arithmetic given: the layer as it is
        assert torch.equal(run_layer(layer, z, torch.float32), exact)
        half = run_layer(layer, z, torch.bfloat16)
    assert half.dtype == torch.float32 and half.shape == z.shape
    change = (exact - z).norm()
    assert float(change / z.norm()) > 0.05  # the layer moves the features ...
    assert 0 < float((half - exact).norm() / change) < 0.02  # ... and bfloat16 moves them the same way (0.004)


def test_task_features_run_the_layer_in_the_backbones_layer_arithmetic(predictor):
    """The predictor applies a task's layer in ``Backbone.layer_dtype`` (bfloat16 autocast where the
    decoder runs in bfloat16, as learning does), through ``run_layer``, and caches that."""
    import numpy as np

    from casam_core.alignment import run_layer

    layer = _moved_layer()
    predictor.add_task("moved", layer)
    rng = np.random.default_rng(0)
    predictor.set_image((rng.random((96, 128, 3)) * 255).astype(np.uint8))
    z = predictor.embedding()[None]
    backbone, saved = predictor.backbone, predictor.backbone.layer_dtype
    try:
        for dtype in (None, torch.bfloat16):
            backbone.layer_dtype = dtype
            predictor.aligned.discard_where(lambda key: True)
            with torch.inference_mode():
                assert torch.equal(predictor.task_features("moved"), run_layer(layer, z, dtype))
        with torch.inference_mode():
            assert not torch.equal(predictor.task_features("moved"), layer(z))  # bfloat16 was used
    finally:
        backbone.layer_dtype = saved
        predictor.aligned.discard_where(lambda key: True)
