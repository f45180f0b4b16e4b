"""Where the committed samples of a source checkout live (no torch, no Qt)."""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
