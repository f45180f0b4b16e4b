"""Shared fixtures: the real LiteMedSAM backbone (built once) and the project's data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from casam_core.samples import SAMPLES  # noqa: F401  (the tests' samples: `from conftest import SAMPLES`)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CASAM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def embedding_cache(tmp_path_factory):
    """One on-disk embedding cache for the session, so tests share their real embeddings; it is
    also $CASAM_CACHE_DIR from the start (the CLI and the viewer default to it, and the encoder's
    OpenVINO model is kept beside it): no test touches the user's own cache."""
    folder = tmp_path_factory.mktemp("embeddings")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASAM_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _isolated_task_library(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's own task library."""
    monkeypatch.setenv("CASAM_LIBRARY", str(tmp_path_factory.mktemp("library")))


def dataset_root(name: str) -> Path:
    root = DATA / name
    if not (root / "dataset.json").is_file():
        pytest.skip(f"real data not found at {root} (set CASAM_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="session")
def backbone():
    from casam_core import build_backbone

    return build_backbone("litemedsam", device="cpu")


@pytest.fixture()
def predictor(backbone):
    from casam_core import CASamPredictor

    return CASamPredictor(backbone)


def dataset_case(name: str, split: str = "test", index: int = 0):
    """(image array, label array) of one real case; skips the test when the data is absent."""
    root = dataset_root(name)
    from casam_core.io import read_image, read_labels

    case = json.loads((root / "dataset.json").read_text())[split][index]
    image = read_image(root / case["image"])
    labels = read_labels(root / case["mask"], like=image)
    return image.array, labels.array


def centre_point(mask: np.ndarray):
    """The foreground pixel nearest the mask centroid, as (x, y) (the evaluation's one click)."""
    from casam_core.prompts import click_from_mask

    x, y = click_from_mask(mask)
    return int(x), int(y)


@pytest.fixture()
def widget(make_napari_viewer, tmp_path, embedding_cache):
    """(viewer, CA-SAM widget) docked in a fresh napari viewer, on the CPU, with its own task library."""
    from napari_casam._widget import CASamWidget

    viewer = make_napari_viewer()
    w = CASamWidget(viewer, library=str(tmp_path / "library"), cache_dir=str(embedding_cache))
    viewer.window.add_dock_widget(w, name="CA-SAM")
    w.device_combo.setCurrentText("cpu")
    return viewer, w

