"""The structure finder's pure parts: targets on the embedding grid, heat to objects, 3D linking."""

import numpy as np
import torch

from casam_core.finder import (Finder, find_objects, grid_targets, heat_on_image, heat_on_slices, outputs_for,
                                train_finder)


def test_targets_follow_the_encoders_resize_and_padding():
    labels = np.zeros((100, 200), np.uint8)
    labels[:, :100] = 1  # the left half is label 1
    t = grid_targets(labels, [1, 2], "class", input_size=(128, 256), img_size=256, grid=64)
    assert t.shape == (2, 64, 64)
    assert float(t[0, :32, :31].min()) == 1.0 and float(t[0, :32, 33:].max()) == 0.0  # (bilinear at the edge)
    assert float(t[0, 32:].max()) == 0.0  # the padding below the image holds nothing
    assert float(t[1].max()) == 0.0  # label 2 is absent
    assert outputs_for("instance", [1, 2, 3]) == [1] and outputs_for("class", {2: "b", 1: "a"}) == [1, 2]


def test_heat_becomes_one_object_per_class_without_specks():
    heat = np.zeros((2, 50, 50), np.float32)
    heat[0, 5:15, 5:15] = 0.9  # two parts of class 1 (e.g. two lungs): one object, one box around both
    heat[0, 5:15, 30:40] = 0.8
    heat[0, 45, 45] = 0.95  # a one-pixel speck
    heat[1, 20:22, 20:22] = 0.4  # under the threshold
    found = find_objects(heat, [1, 2], threshold=0.5)
    assert len(found) == 1 and found[0].label == 1
    assert found[0].boxes[0].tolist() == [5, 5, 39, 14]
    instances = find_objects(heat[:1], [1], threshold=0.5, objects="instance")
    assert sorted(o.boxes[0][0] for o in instances) == [5, 30]


def test_a_structure_is_linked_through_the_slices_of_a_volume():
    heat = np.zeros((6, 1, 30, 30), np.float32)
    for k in range(1, 5):  # a structure drifting right, slice by slice
        heat[k, 0, 10:20, 5 + 2 * k:15 + 2 * k] = 0.9
    found = find_objects(heat, [1], threshold=0.5)
    assert len(found) == 1 and sorted(found[0].boxes) == [1, 2, 3, 4]
    assert found[0].boxes[4].tolist() == [13, 10, 22, 19]


def test_a_slice_the_finder_missed_inside_a_structure_is_bridged():
    heat = np.zeros((12, 1, 30, 30), np.float32)
    for k in (1, 2, 4, 5, 9, 10):  # a dip at slice 3 (one slice) and at 6-8 (three slices: two parts)
        heat[k, 0, 10:20, 10:20 + k] = 0.9
    found = find_objects(heat, [1], threshold=0.5)
    assert len(found) == 1 and sorted(found[0].boxes) == [1, 2, 3, 4, 5, 9, 10]
    assert found[0].boxes[3].tolist() == [10, 10, 22, 19]  # halfway between slices 2 and 4


def test_the_finder_learns_where_a_structure_is():
    gen = torch.Generator().manual_seed(0)
    z, targets = [], []
    for _ in range(8):  # the structure is where channel 0 is high
        t = torch.zeros(1, 16, 16)
        x, y = torch.randint(0, 10, (2,), generator=gen).tolist()
        t[0, y:y + 6, x:x + 6] = 1
        e = torch.randn(256, 16, 16, generator=gen) * 0.1
        e[0] += 2 * t[0]
        z.append(e)
        targets.append(t)
    finder = train_finder(z, targets, 1, steps=150, seed=0)
    assert isinstance(finder, Finder) and not finder.training
    with torch.no_grad():
        p = torch.sigmoid(finder(torch.stack(z)))
    inside = p[torch.stack(targets) > 0.5].mean()
    outside = p[torch.stack(targets) < 0.5].mean()
    assert inside > 0.7 and outside < 0.2, (float(inside), float(outside))
    # a volume's slices get their heat in one call, the same as one slice at a time
    zs = torch.stack(z[:5])
    batch = heat_on_slices(finder, zs, (12, 16), (24, 30), 16)
    assert batch.shape == (5, 1, 24, 30)
    for k in range(5):
        np.testing.assert_allclose(batch[k], heat_on_image(finder, z[k], (12, 16), (24, 30), 16), atol=1e-5)
