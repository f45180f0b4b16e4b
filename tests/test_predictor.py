"""The predictor on real LiteMedSAM weights and real images."""

import numpy as np
import pytest
import torch

from casam_core import AlignmentLayer, CASamPredictor
from casam_core.metrics import dice
from casam_core.errors import PromptError, UnknownTask
from casam_core.prompts import box_from_mask

from conftest import centre_point, dataset_case


@pytest.fixture(scope="module")
def kvasir():
    image, labels = dataset_case("kvasir_polyp", "test", 0)
    return image, labels == 1


@pytest.fixture(scope="module")
def kvasir_predictor(backbone, kvasir):
    predictor = CASamPredictor(backbone)
    predictor.set_image(kvasir[0])
    return predictor


def test_ground_truth_box_segments_the_polyp(kvasir, kvasir_predictor):
    image, gt = kvasir
    assert image.shape[0] != image.shape[1]  # a non-square endoscopy frame
    masks, scores, low = kvasir_predictor.predict_batch(box=box_from_mask(gt))
    assert masks.shape == (1, 1) + gt.shape  # back at the original resolution
    assert low.shape == (1, 1, 256, 256)
    assert dice(masks[0, 0], gt) >= 0.8
    assert 0.5 < scores[0, 0] <= 1.2


def test_a_positive_point_gives_a_mask_that_contains_it(kvasir, kvasir_predictor):
    _, gt = kvasir
    x, y = centre_point(gt)
    masks, scores, _ = kvasir_predictor.predict_batch(point_coords=[[x, y]], point_labels=[1])
    mask = masks[0, 0]
    assert mask.any() and mask[y, x]
    assert dice(mask, gt) > 0.5


def test_a_negative_point_is_respected(kvasir, kvasir_predictor):
    _, gt = kvasir
    x, y = centre_point(gt)
    ys, xs = np.nonzero(~gt)
    far = int(np.argmax((ys - y) ** 2 + (xs - x) ** 2))
    masks, _, _ = kvasir_predictor.predict_batch(point_coords=[[x, y], [xs[far], ys[far]]], point_labels=[1, 0])
    assert masks[0, 0, y, x] and not masks[0, 0, ys[far], xs[far]]


def test_several_boxes_at_once(kvasir, kvasir_predictor):
    _, gt = kvasir
    box = box_from_mask(gt)
    h, w = gt.shape
    boxes = np.stack([box, [0, 0, w // 4, h // 4]])
    masks, scores, low = kvasir_predictor.predict_batch(box=boxes)
    assert masks.shape == (2, 1, h, w) and scores.shape == (2, 1)
    single, _, _ = kvasir_predictor.predict_batch(box=box)
    assert dice(masks[0, 0], single[0, 0]) > 0.99


def test_multimask_and_mask_input(kvasir, kvasir_predictor):
    _, gt = kvasir
    masks, scores, low = kvasir_predictor.predict_batch(box=box_from_mask(gt), multimask_output=True)
    assert masks.shape == (1, 3) + gt.shape and low.shape == (1, 3, 256, 256)
    refined, _, _ = kvasir_predictor.predict_batch(box=box_from_mask(gt), mask_input=low[0, :1])
    assert dice(refined[0, 0], gt) >= 0.8


def test_the_embedding_is_computed_once_per_image(backbone, kvasir):
    predictor = CASamPredictor(backbone)
    predictor.set_image(kvasir[0])
    predictor.set_image(kvasir[0].copy())
    assert predictor.encoder_calls == 1
    other = kvasir[0].copy()
    other[0, 0, 0] ^= 1  # one different pixel is another image
    predictor.set_image(other)
    assert predictor.encoder_calls == 2


def test_tasks_apply_to_cached_features_once(kvasir, kvasir_predictor):
    _, gt = kvasir
    box = box_from_mask(gt)
    frozen, frozen_scores, _ = kvasir_predictor.predict_batch(box=box)
    layer = AlignmentLayer(form="gated")  # gate at 0: exactly the frozen model
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    kvasir_predictor.add_task("polyp", layer)
    for _ in range(3):
        aligned, aligned_scores, _ = kvasir_predictor.predict_batch(box=box, task="polyp")
    assert len(calls) == 1  # applied once, then cached per (image, task)
    assert np.array_equal(aligned, frozen) and np.allclose(aligned_scores, frozen_scores)
    # a paper-form layer with random init really changes what the decoder sees
    torch.manual_seed(0)
    kvasir_predictor.add_task("polyp", AlignmentLayer())  # replacing a task drops its cache
    changed, _, _ = kvasir_predictor.predict_batch(box=box, task="polyp")
    assert not np.array_equal(changed, frozen)
    with pytest.raises(UnknownTask, match="unknown task 'liver'"):
        kvasir_predictor.predict_batch(box=box, task="liver")
    kvasir_predictor.remove_task("polyp")


def test_disk_cache_reuses_and_detects_stale_entries(backbone, kvasir, tmp_path):
    first = CASamPredictor(backbone, disk_cache=tmp_path)
    rec = first.set_image(kvasir[0])
    z = first.embedding().clone()
    second = CASamPredictor(backbone, disk_cache=tmp_path)
    second.set_image(kvasir[0])
    assert second.encoder_calls == 0 and torch.equal(second.embedding(), z)
    # an entry written for another backbone under the same name is stale: not used
    from safetensors.torch import save_file

    (entry,) = list(tmp_path.rglob(f"{rec.key}.safetensors"))
    save_file({"embedding": torch.zeros(256, 64, 64)}, str(entry),
              metadata={"format": "casam-embedding-1", "key": rec.key, "fingerprint": "sam_vit_b:0000"})
    third = CASamPredictor(backbone, disk_cache=tmp_path)
    third.set_image(kvasir[0])
    assert third.encoder_calls == 1 and third.disk.stale_found == 1
    assert torch.equal(third.embedding(), z)
    entry.write_bytes(b"truncated")
    fourth = CASamPredictor(backbone, disk_cache=tmp_path)
    fourth.set_image(kvasir[0])
    assert fourth.encoder_calls == 1 and torch.equal(fourth.embedding(), z)
    # data zeroed, noised or set to NaN behind an intact header: the checksum finds it
    import struct

    good = entry.read_bytes()
    start = 8 + struct.unpack("<Q", good[:8])[0]
    rng = np.random.default_rng(0)
    for damage in (bytes(len(good) - start), rng.bytes(len(good) - start), b"\x00\x7e" * ((len(good) - start) // 2),
                   good[start:start + 100] + bytes([good[start + 100] ^ 1]) + good[start + 101:]):
        entry.write_bytes(good[:start] + damage)
        damaged = CASamPredictor(backbone, disk_cache=tmp_path)
        damaged.set_image(kvasir[0])
        assert damaged.encoder_calls == 1 and damaged.disk.stale_found == 1
        assert torch.equal(damaged.embedding(), z)
        again = CASamPredictor(backbone, disk_cache=tmp_path)  # recomputed and written again
        again.set_image(kvasir[0])
        assert again.encoder_calls == 0 and torch.equal(again.embedding(), z)
        good = entry.read_bytes()


def test_disk_cache_is_bounded_and_keeps_what_was_used_last(tmp_path, monkeypatch):
    import os

    from casam_core.cache import DiskEmbeddingCache
    from casam_core.errors import OptionError

    # temporary files: one of a writer that no longer runs, one two hours old, go when the cache
    # is opened; a fresh one of a running writer (this process) stays
    import socket
    import subprocess
    import sys

    (tmp_path / "probe" / "aa").mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:40]
    dead_tmp = tmp_path / "probe" / "aa" / f".aa33.safetensors~{host}~{int(gone.stdout)}~q9.tmp.safetensors"
    old_tmp = tmp_path / "probe" / "aa" / ".aa11.safetensors.x1y2.tmp.safetensors"
    new_tmp = tmp_path / "probe" / "aa" / f".aa22.safetensors~{host}~{os.getpid()}~z3w4.tmp.safetensors"
    for f in (dead_tmp, old_tmp, new_tmp):
        f.write_bytes(bytes(4 << 10))
    os.utime(old_tmp, (os.path.getmtime(old_tmp) - 7200,) * 2)
    probe = DiskEmbeddingCache(tmp_path / "probe", "fp", max_bytes=10**9)
    assert probe.swept == 2 and not old_tmp.exists() and not dead_tmp.exists() and new_tmp.exists()
    probe.save("aa00", torch.zeros(4, 8, 8))
    assert [e[2].name for e in probe._entries()] == ["aa00.safetensors"]  # temporaries are not entries
    new_tmp.unlink()
    entry = next((tmp_path / "probe").rglob("*.safetensors")).stat().st_size
    cache = DiskEmbeddingCache(tmp_path / "cache", "fp", max_bytes=int(3.5 * entry))
    for i, key in enumerate(("k1", "k2", "k3")):
        cache.save(key, torch.full((4, 8, 8), float(i)))
        os.utime(cache._path(key), (1000 + i, 1000 + i))  # saved in this order, seconds apart
    assert cache.load("k1", (4, 8, 8)) is not None  # k1 used again: k2 is now the least recently used
    cache.save("k4", torch.ones(4, 8, 8))  # over the bound: pruned back under 90 % of it
    kept = sorted(p.stem for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert kept == ["k1", "k3", "k4"], kept  # k2 went first
    assert sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.safetensors")) <= 3.5 * entry
    monkeypatch.setenv("CASAM_CACHE_MAX_GB", "lots")
    with pytest.raises(OptionError, match="CASAM_CACHE_MAX_GB"):
        DiskEmbeddingCache(tmp_path / "other", "fp")


def test_memory_cache_is_bounded(backbone):
    predictor = CASamPredictor(backbone, memory_bytes=2 * 256 * 64 * 64 * 2)  # two float16 embeddings
    rng = np.random.default_rng(1)
    images = [(rng.random((64, 64)) * 255).astype(np.uint8) for _ in range(3)]
    for im in images:
        predictor.set_image(im)
    assert len(predictor.embeddings) == 2
    predictor.set_image(images[0])  # evicted: computed again
    assert predictor.encoder_calls == 4


def test_prompt_errors_are_clear(kvasir_predictor):
    with pytest.raises(PromptError, match="at least one prompt"):
        kvasir_predictor.predict_batch()
    with pytest.raises(PromptError, match="x0 <= x1"):
        kvasir_predictor.predict_batch(box=[50, 50, 10, 10])
    with pytest.raises(PromptError, match=r"\(4,\) or \(B, 4\)"):
        kvasir_predictor.predict_batch(box=[1, 2, 3])
    with pytest.raises(PromptError, match="point_labels are needed"):
        kvasir_predictor.predict_batch(point_coords=[[10, 10]])
    with pytest.raises(PromptError, match="outside"):
        kvasir_predictor.predict_batch(point_coords=[[10_000, 10]], point_labels=[1])
    with pytest.raises(PromptError, match="finite"):
        kvasir_predictor.predict_batch(box=[0, 0, np.nan, 10])


def test_predict_before_an_image_is_set(predictor):
    with pytest.raises(RuntimeError, match="no image is set"):
        predictor.predict_batch(box=[0, 0, 10, 10])


def test_a_click_on_a_task_with_a_click_box_decodes_one_box_of_that_size(kvasir, kvasir_predictor):
    _, gt = kvasir
    x, y = centre_point(gt)
    h, w = gt.shape
    p = kvasir_predictor
    p.add_task("clicks", AlignmentLayer(form="residual"), card={"point_prompts": "click_box", "click_box": [0.5, 0.25]})
    try:
        assert p.click_decoding("clicks") == {"click_box": (0.5, 0.25)}
        clicked, scores, low = p.predict_batch(point_coords=[[x, y]], point_labels=[1], task="clicks")
        half_w, half_h = 0.5 * max(h, w) / 2, 0.25 * max(h, w) / 2
        boxed, scores_b, low_b = p.predict_batch(box=[x - half_w, y - half_h, x + half_w, y + half_h], task="clicks")
        # one decode of that box: the same masks and scores (up to the box's float rounding, which a
        # bfloat16 decoder turns into a few boundary pixels: 31 of 329,130 measured)
        assert clicked.shape == boxed.shape and float((clicked == boxed).mean()) > 0.999
        np.testing.assert_allclose(scores, scores_b, atol=0.01)
        # a negative click cannot be a box: the box search handles it, as on the frozen model
        ys, xs = np.nonzero(~gt)
        masks, _, _ = p.predict_batch(point_coords=[[x, y], [xs[0], ys[0]]], point_labels=[1, 0], task="clicks")
        assert not masks[0, 0, ys[0], xs[0]]
    finally:
        p.remove_task("clicks")
    assert p.click_decoding("clicks") == {} and p.click_decoding(None) == {}


def _segment_anything_usage(predictor, image, box, click):
    """segment-anything's documented predictor usage (its README and predictor example notebook),
    unchanged: one click with three masks, the best one's logits fed back, a box, boxes in batch."""
    predictor.set_image(image)
    assert predictor.is_image_set and predictor.original_size == image.shape[:2]
    input_point, input_label = np.array([click]), np.array([1])
    masks, scores, logits = predictor.predict(point_coords=input_point, point_labels=input_label,
                                              multimask_output=True)
    assert masks.shape == (3,) + image.shape[:2] and scores.shape == (3,) and logits.shape == (3, 256, 256)
    mask_input = logits[np.argmax(scores), :, :]
    masks, _, _ = predictor.predict(point_coords=input_point, point_labels=input_label,
                                    mask_input=mask_input[None, :, :], multimask_output=False)
    assert masks.shape == (1,) + image.shape[:2] and masks.dtype == bool
    box_masks, _, _ = predictor.predict(point_coords=None, point_labels=None, box=np.array(box)[None, :],
                                        multimask_output=False)
    input_boxes = torch.tensor([box, box], device=predictor.device)
    transformed_boxes = predictor.transform.apply_boxes_torch(input_boxes, image.shape[:2])
    batch, _, _ = predictor.predict_torch(point_coords=None, point_labels=None, boxes=transformed_boxes,
                                          multimask_output=False)
    assert batch.shape == (2, 1) + image.shape[:2]
    embedding = predictor.get_image_embedding()
    assert embedding.shape[0] == 1 and embedding.shape[1] == 256 and predictor.input_size is not None
    predictor.reset_image()
    assert not predictor.is_image_set
    return box_masks[0], batch[0, 0].cpu().numpy()


def test_segment_anything_usage_runs_unchanged_on_both_predictors(backbone, kvasir):
    """The same code on segment-anything's own SamPredictor (a small random SAM: its contract, not
    its accuracy) and on CASamPredictor (real LiteMedSAM): a drop-in, shapes and idioms included."""
    from segment_anything import SamPredictor
    from segment_anything.build_sam import _build_sam

    image, gt = kvasir
    box = [float(v) for v in box_from_mask(gt)]
    click = list(centre_point(gt))
    torch.manual_seed(0)
    sam = _build_sam(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2,
                     encoder_global_attn_indexes=[0], checkpoint=None).eval()
    _segment_anything_usage(SamPredictor(sam), image, box, click)
    mask, batched = _segment_anything_usage(CASamPredictor(backbone), image, box, click)
    assert dice(mask, gt) >= 0.8 and dice(batched, mask) > 0.99  # a box in pixels = the same box through transform


def test_predict_takes_one_object_and_says_where_batches_go(kvasir_predictor):
    with pytest.raises(PromptError, match="predict_batch"):
        kvasir_predictor.predict(box=[[0, 0, 10, 10], [5, 5, 20, 20]])


def test_a_corrective_click_edits_the_earlier_mask_only_inside_its_box():
    from casam_core.clicks import local_edits

    before = torch.full((32, 32), -5.0)
    before[8:16, 8:16] = 5.0  # the earlier mask
    local = torch.full((1, 32, 32), -5.0)
    local[0, 4:30, 16:30] = 5.0  # what the box at the click sees: reaches far beyond its box
    box = torch.tensor([[14.0, 6.0, 24.0, 16.0]])
    added = local_edits(before, local, box, (20, 10), positive=True)[0] > 0
    assert added[8:16, 8:16].all() and added[10, 20]  # the earlier mask stays, the click's part joins
    assert not added[25, 20] and not added[10, 28]  # nothing outside the box
    # a negative click on a part the local decode calls foreground: that part goes, inside the box only
    grown = torch.where(local[0] > 0, 5.0, before)
    cut = local_edits(grown, local, box, (20, 10), positive=False)[0] > 0
    assert not cut[10, 20] and cut[25, 20] and cut[8:16, 8:14].all()
    # a negative click where the local decode sees background: inside the box only both-foreground stays
    kept = local_edits(before, local, torch.tensor([[4.0, 4.0, 14.0, 14.0]]), (10, 10), positive=False)[0] > 0
    assert not kept[8:14, 8:14].any() and kept[15, 15]


def test_embeddings_are_kept_as_float16_and_give_the_float32_masks(backbone, kvasir, tmp_path):
    image, gt = kvasir
    box = box_from_mask(gt)
    half = CASamPredictor(backbone, disk_cache=tmp_path)
    full = CASamPredictor(backbone, embedding_dtype=torch.float32)
    for p in (half, full):
        p.set_image(image)
    assert half.embeddings.nbytes * 2 == full.embeddings.nbytes == 256 * 64 * 64 * 4
    assert half.embedding().dtype == torch.float32  # decoded in float32 whatever is stored
    assert (half.embedding() - full.embedding()).abs().max() < 5e-3
    (entry,) = list(tmp_path.rglob("*.safetensors"))
    assert entry.stat().st_size < 256 * 64 * 64 * 2 + 4096  # float16 on disk too
    m_half = half.predict_batch(box=box)[0][0, 0]
    m_full = full.predict_batch(box=box)[0][0, 0]
    assert dice(m_half, m_full) > 0.995
    with pytest.raises(Exception, match="float16 or torch.float32"):
        CASamPredictor(backbone, embedding_dtype=torch.int8)


def test_a_first_click_decodes_its_candidates_only_where_the_clicks_are_and_keeps_the_masks(backbone, monkeypatch):
    """A point-only click on the box-trained LiteMedSAM searches boxes. On the fast runtime the
    candidates are decoded up to the upscaling (the image not copied per candidate), scored by
    their logits at the clicks alone, and only the winner is upscaled (``Candidates``). In
    float32 PyTorch those pieces, and the converted decoder's graph (its attentions folded to the
    prompt tokens' side, its upscaling token by token), equal the decoder's own masks; on the default runtime the
    clicks' masks are those of decoding every candidate whole, but for bfloat16 rounding."""
    from casam_core.backbones import Backbone, Candidates
    from casam_core.decoder_graphs import DecoderGraph, SearchGraph, UpscaleGraph
    from casam_core.runtimes import SEARCH_CANDIDATES
    from casam_core.clicks import POINT_SEARCH_FRACTIONS

    assert SEARCH_CANDIDATES == len(POINT_SEARCH_FRACTIONS)  # the static copy is the one a click uses
    image, labels = dataset_case("hc18_fetal_head", "test", 0)
    predictor = CASamPredictor(backbone)
    predictor.set_image(image)
    z = predictor.embedding()[None].float()
    boxes = torch.tensor([[30.0, 40.0, 60.0, 90.0], [10.0, 10.0, 200.0, 150.0], [100.0, 60.0, 250.0, 250.0]])
    sparse, dense = backbone.prompt_encoder(points=None, boxes=boxes, masks=None)
    with torch.inference_mode():  # the split in eager float32 PyTorch, against the decoder itself
        keys, hyper, iou = SearchGraph(backbone)(z, sparse, dense[:1])
        low, iou_ref = backbone.mask_decoder.predict_masks(z, backbone.prompt_encoder.get_dense_pe(), sparse, dense)
    split = Candidates(iou, keys=keys, hyper=hyper, upscale=UpscaleGraph(backbone),
                       upscaling=backbone.mask_decoder.output_upscaling, grid=backbone.embedding_shape[1:])
    ij = torch.tensor([[0, 0], [37, 101], [128, 128], [255, 3], [66, 200], [131, 250]])
    assert float((iou - iou_ref).abs().max()) < 1e-4
    assert float((split.logits_at(ij) - low[:, :, ij[:, 1], ij[:, 0]]).abs().max()) < 1e-3
    with torch.inference_mode():
        assert all(float((split.masks(k) - low[k: k + 1]).abs().max()) < 1e-3 for k in range(3))
    assert split.logits_at(ij[:0]).shape == (3, 4, 0)
    with torch.inference_mode():  # the converted decoder's graph (upscaling token by token): its masks too,
        prior = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(0))  # with mask prompts
        sparse_m, dense_m = backbone.prompt_encoder(points=None, boxes=boxes, masks=prior)
        whole, iou_whole = DecoderGraph(backbone)(z, sparse_m, dense_m)
        low_m, iou_m = backbone.mask_decoder.predict_masks(z, backbone.prompt_encoder.get_dense_pe(), sparse_m, dense_m)
    assert whole.shape == low_m.shape and float((whole - low_m).abs().max()) < 1e-3
    assert float((iou_whole - iou_m).abs().max()) < 1e-4 and float(low_m.abs().max()) > 1

    if getattr(backbone._fast_decoder, "search", None) is None:
        pytest.fail(f"the fast runtime's box search did not pass its check: {backbone.runtime_note}")
    decode_candidates = Backbone.decode_candidates
    for name in ("hc18_fetal_head", "kvasir_polyp", "covid19_ct_infection"):
        for index in range(3):
            image, labels = dataset_case(name, "test", index)
            target = labels > 0
            predictor.set_image(image)
            click = {"point_coords": [centre_point(target)], "point_labels": [1]}
            got = [predictor.predict(**click, multimask_output=multi) for multi in (False, True)]
            monkeypatch.setattr(Backbone, "decode_candidates",
                                lambda self, z, b, whole=False: decode_candidates(self, z, b, whole=True))
            ref = [predictor.predict(**click, multimask_output=multi) for multi in (False, True)]
            monkeypatch.setattr(Backbone, "decode_candidates", decode_candidates)
            for (m, s, _), (m_ref, s_ref, _) in zip(got, ref):
                assert m.shape == m_ref.shape and float((m == m_ref).mean()) > 0.995, (name, index)
                assert np.abs(s - s_ref).max() < 0.05
                assert abs(dice(m[0], target) - dice(m_ref[0], target)) < 0.01
