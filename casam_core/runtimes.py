"""Where the frozen image encoder runs: eager PyTorch (the reference) or OpenVINO on a CPU.

The encoder is the cost of opening an image or a volume (one call per slice). On a CPU,
OpenVINO runs the same graph, converted once per backbone fingerprint and kept beside the
embedding cache (``<cache>/encoders``). Before it is used, its output on a probe image is
compared with eager PyTorch's; a runtime that disagrees by more than its tolerance is not
used (the reason is kept in ``Backbone.runtime_note``). Nothing else changes: the prompt
encoder, the mask decoder and the Alignment Layers stay in PyTorch (learning
back-propagates through the decoder).

    runtime "torch"     eager PyTorch, everywhere (the reference)
    runtime "openvino"  OpenVINO on the CPU, float32 (outputs within 1e-3 of the reference)
    runtime "auto"      OpenVINO when the device is the CPU and it is installed, else torch

``$CASAM_RUNTIME`` sets the default.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from .config import cache_dir
from .errors import look_up_option
from .io import write_json

RUNTIMES = ("auto", "torch", "openvino")
ENV_RUNTIME = "CASAM_RUNTIME"
TOLERANCE = 1e-3  # largest absolute difference from eager PyTorch on the probe image


def chosen_runtime(runtime: Optional[str] = None) -> str:
    """The runtime asked for (``runtime``, else ``$CASAM_RUNTIME``, else "auto")."""
    return look_up_option(runtime or os.environ.get(ENV_RUNTIME) or "auto", RUNTIMES, "runtime")


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def accelerate(encoder: torch.nn.Module, img_size: int, fingerprint: str, device: torch.device,
               runtime: Optional[str] = None) -> Tuple[Optional[Callable], str]:
    """(a function (B, 3, S, S) -> embeddings that replaces ``encoder``, or None for eager PyTorch;
    a one-line note on what runs the encoder and why)."""
    runtime = chosen_runtime(runtime)
    if runtime == "torch":
        return None, "torch (eager)"
    if device.type != "cpu":
        return None, f"torch on {device.type} (OpenVINO is used on the CPU only)"
    if not openvino_available():
        if runtime == "openvino":
            from .errors import OptionError

            raise OptionError("runtime 'openvino' asked for, but the openvino package is not installed")
        return None, "torch (eager; openvino is not installed)"
    try:
        run = _OpenVINOEncoder(encoder, img_size, fingerprint)
        diff = run.verified_difference()
        if diff is None:  # first use of this converted model with this OpenVINO: compare with eager once
            probe = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                diff = float((run(probe) - encoder(probe)).abs().max())
            if diff <= TOLERANCE:
                run.record_verification(diff)
    except Exception as exc:  # a read-only cache, a damaged converted model, a model OpenVINO cannot take
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if runtime == "openvino":
            from .errors import OptionError

            raise OptionError(f"runtime 'openvino' cannot run this encoder ({why})") from exc
        return None, f"torch (eager; OpenVINO failed: {why})"
    if not diff <= TOLERANCE:
        return None, f"torch (eager; OpenVINO differed by {diff:.2g} on the probe image)"
    return run, f"openvino CPU float32 (max difference {diff:.1e} on the probe image)"


class _OpenVINOEncoder:
    """The encoder as an OpenVINO model, compiled for the CPU in float32. One inference at a time
    (callers serialise model calls: the plugin's lock, one CLI command, one learning process)."""

    def __init__(self, encoder: torch.nn.Module, img_size: int, fingerprint: str) -> None:
        import openvino as ov

        core = ov.Core()
        self._xml = _ir_path(fingerprint, img_size)
        core.set_property({"CACHE_DIR": str(self._xml.parent / "compiled")})  # compiled once, then loaded
        if not self._xml.is_file():
            _convert(encoder, img_size, self._xml)
        threads = max(1, torch.get_num_threads())
        self._version = ov.__version__
        self._model = core.compile_model(str(self._xml), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
        self._request = self._model.create_infer_request()

    @property
    def _record(self) -> Path:
        return self._xml.with_suffix(".verified.json")

    def verified_difference(self) -> Optional[float]:
        """The probe difference recorded for this model and this OpenVINO version (None: not yet)."""
        try:
            record = json.loads(self._record.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(record, dict) and record.get("openvino") == self._version
        return float(record["max_difference"]) if ok and isinstance(record.get("max_difference"), float) else None

    def record_verification(self, diff: float) -> None:
        try:
            write_json({"openvino": self._version, "max_difference": diff}, self._record)
        except OSError:  # a read-only cache: the probe runs again next time
            pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:  # converted for one slice at a time
            return torch.cat([self(x[i: i + 1]) for i in range(x.shape[0])])
        result = self._request.infer({0: x.detach().cpu().numpy()})
        return torch.from_numpy(result[self._model.output(0)].copy())


def _ir_path(fingerprint: str, img_size: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in fingerprint)
    return cache_dir() / "encoders" / f"{safe}-{img_size}.xml"


def _convert(encoder: torch.nn.Module, img_size: int, xml: Path) -> None:
    """Convert once and save the model (.xml + .bin) atomically: a crash leaves no half model."""
    import openvino as ov

    xml.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about the model's code: not the user's concern
        model = ov.convert_model(encoder, example_input=torch.zeros(1, 3, img_size, img_size))
    tmp = Path(tempfile.mkdtemp(dir=xml.parent, prefix=".converting-"))
    try:
        ov.save_model(model, str(tmp / xml.name), compress_to_fp16=False)
        os.replace(tmp / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
        os.replace(tmp / xml.name, xml)  # the .xml last: it is what marks the model as there
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
