"""Where the frozen graphs run: eager PyTorch (the reference) or OpenVINO on a CPU.

The image encoder is the cost of opening an image or a volume (one call per slice); the mask
decoder is the cost of a click. On a CPU, OpenVINO runs the same graphs, converted once per
backbone fingerprint and kept beside the embedding cache (``<cache>/encoders``). Before one
is used, its outputs on a probe are compared with eager PyTorch's; a graph that disagrees by
more than the tolerance stays in PyTorch (the reason is kept in ``Backbone.runtime_note``).
The prompt encoder and the Alignment Layers stay in PyTorch, and so does the mask decoder
whenever gradients are on: learning back-propagates through it. The converted decoder groups
the decoder's arithmetic differently, with the same result within float rounding (tested in
float32 against ``MaskDecoder.predict_masks``): its attentions to and from the image work on the
few prompt tokens' side and its upscaling runs token by token (``casam_core.decoder_graphs``).

    runtime "torch"     eager PyTorch, everywhere (the reference)
    runtime "openvino"  OpenVINO on the CPU, float32 (outputs within 1e-3 of the reference)
    runtime "auto"      OpenVINO when the device is the CPU and it is installed, else torch

``$CASAM_RUNTIME`` sets the default.

The arithmetic on OpenVINO (``$CASAM_PRECISION``), on a CPU that computes bfloat16 natively
(AVX512-BF16 or AMX; elsewhere float32 throughout, and asking for "bf16" is refused):
    "auto" (the default)  the decoder in bfloat16 (a click in about half the time), the encoder
                          in float32
    "bf16"                the encoder too (faster per slice: ``benchmarks/results/runtime_cpu.md``)
    "f32"                 float32 throughout
A bfloat16 decoder is used only if, on the probe, at least 99.5 % of its mask pixels agree with
the reference and its IoU predictions are within 0.02 (GT-box Dice within 0.0002 on kvasir_polyp
and hc18_fetal_head, ``benchmarks/runtime.py``). A bfloat16 encoder is used only if its embedding
of the probe is within 10 % RMS of the reference's; on real images its embeddings are about 6 %
RMS away, which leaves frozen GT-box Dice within 0.0002 and routes unchanged but moves learned
hippocampus layers by about -0.9 Dice points (``benchmarks/encoder_arithmetic.py``): so it is
not the default. Embeddings are cached per encoder arithmetic (``Backbone.embedding_key``).
The Alignment Layers follow the decoder: where it runs in bfloat16, a layer runs in PyTorch's
bfloat16 autocast, in a learning step's forward pass (``training.learning_arithmetic``) and in use
and its held-out checks (``alignment.run_layer``; ``benchmarks/layer_arithmetic.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .config import cache_dir, child_environment
from .errors import look_up_option
from . import decoder_graphs
from .files import waiting_lock, write_json

RUNTIMES = ("auto", "torch", "openvino")
ENV_RUNTIME = "CASAM_RUNTIME"
TOLERANCE = 1e-3  # largest absolute difference from eager PyTorch on the probe image
PRECISIONS = ("auto", "f32", "bf16")
ENV_PRECISION = "CASAM_PRECISION"
BF16_MIN_AGREEMENT = 0.995  # a bfloat16 decoder: share of the probe's mask pixels that agree with float32
BF16_MAX_IOU_DIFFERENCE = 0.02  # ... and the largest difference of its IoU predictions
BF16_MAX_RELATIVE_RMS = 0.1  # a bfloat16 encoder: RMS difference of the probe's embedding / its RMS
GRAPHS = "v3"  # in the converted decoders' file names: v2 upscales token by token (UpscaleGraph), v3 folds
# the attentions to and from the image (decoder_graphs.two_way)
CHECK_COMMAND = [sys.executable, "-m", "casam_core._ov_check"]  # a converted graph's first run, in a child
CHECK_TIMEOUT_S = 900
CONVERT_LOCK = ".convert.lock"  # in the models folder: held while a process converts, checks and compiles
CONVERT_LOCK_TIMEOUT_S = 2 * CHECK_TIMEOUT_S  # waited for at most (then it goes on unlocked, as before the lock)
SEARCH_CANDIDATES = 6  # the boxes a first click is searched with (clicks.POINT_SEARCH_FRACTIONS): a static copy


def chosen_runtime(runtime: Optional[str] = None) -> str:
    """The runtime asked for (``runtime``, else ``$CASAM_RUNTIME``, else "auto")."""
    return look_up_option(runtime or os.environ.get(ENV_RUNTIME) or "auto", RUNTIMES, "runtime")


def openvino_precision(precision: Optional[str] = None) -> Tuple[str, str]:
    """The (encoder's, decoder's) arithmetic on OpenVINO, each "f32" or "bf16": ``precision``, else
    ``$CASAM_PRECISION``, else "auto" (the decoder in bfloat16 where this CPU computes it natively)."""
    chosen, what = _asked_precision(precision)
    if chosen == "f32":
        return "f32", "f32"
    if not native_bf16():
        if chosen == "bf16":
            from .errors import OptionError

            raise OptionError(f"{what} 'bf16' asked for, but this CPU does not compute bfloat16 natively "
                              "(no AVX512-BF16 or AMX); use 'f32'")
        return "f32", "f32"
    return ("bf16" if chosen == "bf16" else "f32"), "bf16"


def _asked_precision(precision: Optional[str]) -> Tuple[str, str]:
    """(the precision asked for, checked against PRECISIONS; where it was asked: the argument or
    the variable)."""
    what = "precision" if precision else f"${ENV_PRECISION}"
    return look_up_option(precision or os.environ.get(ENV_PRECISION) or "auto", PRECISIONS, what), what


def native_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def accelerate(backbone, runtime: Optional[str] = None, precision: Optional[str] = None
               ) -> Tuple[Optional[Callable], Optional[Callable], str]:
    """Where ``backbone``'s frozen graphs run: (a function (B, 3, S, S) -> embeddings that replaces
    its image encoder, or None for eager PyTorch; a function (embeddings, sparse, dense) -> (all
    mask logits, all IoU predictions) that replaces its mask decoder in inference, or None; a
    one-line note on what runs them and why). ``precision``: see ``openvino_precision``."""
    runtime = chosen_runtime(runtime)
    _asked_precision(precision)  # a misspelt precision is refused on every runtime
    if runtime == "torch":
        return None, None, "torch (eager)"
    if backbone.device.type != "cpu":
        return None, None, f"torch on {backbone.device.type} (OpenVINO is used on the CPU only)"
    if not openvino_available():
        if runtime == "openvino":
            from .errors import OptionError

            raise OptionError("runtime 'openvino' asked for, but the openvino package is not installed")
        return None, None, "torch (eager; openvino is not installed)"
    runs, why = {}, {}
    encoder_precision, precision = openvino_precision(precision)
    # one process at a time converts, checks and compiles into one folder: OpenVINO writes its
    # compiled copies in place, so a second process starting at once could read one half-written
    with waiting_lock((backbone.models_dir or models_folder()) / CONVERT_LOCK, CONVERT_LOCK_TIMEOUT_S):
        for part, build, probe in (("encoder", lambda b: _OpenVINOEncoder(b, encoder_precision), _encoder_probe),
                                   ("decoder", lambda b: _OpenVINODecoder(b, precision), _decoder_probe),
                                   ("box search", lambda b: _OpenVINOSearch(b, precision), _decoder_probe)):
            if part == "box search" and "decoder" not in runs:
                break
            try:  # each part on its own: a decoder OpenVINO cannot take leaves the encoder's speed
                run = _verified(build(backbone), *probe(backbone))
            except Exception as exc:  # a read-only cache, a damaged converted model, a graph OpenVINO cannot take
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if runtime == "openvino":
                    from .errors import OptionError

                    raise OptionError(f"runtime 'openvino' cannot run this backbone's {part} ({reason})") from exc
                why[part] = f"OpenVINO failed: {reason}"
                continue
            if isinstance(run, float):
                why[part] = f"OpenVINO differed by {run:.2g} on the probe"
            else:
                runs[part] = run
    if not runs:
        return None, None, "torch (eager; " + "; ".join(dict.fromkeys(why.values())) + ")"
    if "decoder" in runs:  # clicks' candidate boxes: masks only where the clicks are, then the winner's
        runs["decoder"].search = runs.pop("box search", None)
    full = {part: run for part, run in runs.items() if run.precision == "f32"}
    notes = []
    if full:
        notes.append(f"openvino CPU float32, {' and '.join(full)} (max difference "
                     f"{max(r.difference for r in full.values()):.1e} on the probe)")
    half = []
    if "encoder" in runs and runs["encoder"].precision == "bf16":
        half.append(f"encoder (embedding within {100 * runs['encoder'].relative:.1f} % RMS of float32 on the probe)")
    if "decoder" in runs and runs["decoder"].precision == "bf16":
        run = runs["decoder"]
        half.append(f"decoder ({100 * run.agreement:.2f} % of the probe's mask pixels agree with float32, "
                    f"logits within {run.difference:.2g})")
    if half:
        notes.append(f"openvino CPU bfloat16 (this CPU's native type), {' and '.join(half)}")
    return runs.get("encoder"), runs.get("decoder"), "; ".join(
        notes + [f"the {part} in torch (eager; {reason})" if part != "box search" else
                 f"the box search decodes whole masks ({reason})" for part, reason in why.items()])


def _encoder_probe(backbone):
    """A random image, and the eager encoder."""
    size = backbone.img_size
    probe = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return [(probe,)], backbone.image_encoder


def _decoder_probe(backbone):
    """Random embeddings with two boxes (B = 2), one (B = 1) and a click's search
    (``SEARCH_CANDIDATES`` boxes), and the eager mask decoder."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, *backbone.embedding_shape, generator=g)
    boxes = torch.tensor([[20.0, 30.0, 120.0, 140.0], [60.0, 10.0, 200.0, 90.0]]) * backbone.img_size / 256
    half = torch.linspace(4.0, 100.0, SEARCH_CANDIDATES)[:, None]
    search = torch.cat([128 - half, 128 + half], 1).repeat(1, 2)[:, [0, 2, 1, 3]] * backbone.img_size / 256
    probes = [(z, *backbone.prompt_encoder(points=None, boxes=b, masks=None)) for b in (boxes, boxes[:1], search)]
    pe = backbone.prompt_encoder.get_dense_pe()
    return probes, lambda z, s, d: backbone.mask_decoder.predict_masks(z, pe, s, d)


def _verified(run: "_OpenVINOModel", probes, eager):
    """``run`` when its outputs are within TOLERANCE of eager PyTorch's on every probe (compared
    once per converted model and OpenVINO version), else the difference found (a float)."""
    def both(out):
        return out if isinstance(out, (tuple, list)) else (out,)

    record = run.verified_difference()
    if record is None:
        with torch.inference_mode():
            pairs = [(both(run(*inputs)), both(eager(*inputs))) for inputs in probes]
        diff = max(float((a - b).abs().max()) for fast, ref in pairs for a, b in zip(fast, ref))
        relative = max(float((fast[0] - ref[0]).pow(2).mean().sqrt() / ref[0].pow(2).mean().sqrt().clamp_min(1e-12))
                       for fast, ref in pairs)
        agreement, iou = 1.0, 0.0
        if len(pairs[0][0]) > 1:  # the decoder: (mask logits, IoU predictions)
            agreement = min(float(((fast[0] > 0) == (ref[0] > 0)).float().mean()) for fast, ref in pairs)
            iou = max(float((fast[1] - ref[1]).abs().max()) for fast, ref in pairs)
        if run.precision == "f32":
            ok = diff <= TOLERANCE
        elif len(pairs[0][0]) > 1:
            ok = agreement >= BF16_MIN_AGREEMENT and iou <= BF16_MAX_IOU_DIFFERENCE
        else:  # a bfloat16 encoder: its embedding, as a whole, near the reference's
            ok = relative <= BF16_MAX_RELATIVE_RMS
        if not ok:
            return diff
        run.record_verification(diff, agreement, relative)
        record = (diff, agreement, relative)
    run.difference, run.agreement, run.relative = record
    return run


class _OpenVINOModel:
    """A frozen graph as an OpenVINO model, converted once (``convert``) and compiled for the CPU
    in ``precision`` ("f32" or "bf16"). One inference at a time (callers serialise model calls: the plugin's lock, one CLI
    command, one learning process)."""

    difference = 0.0
    agreement = 1.0
    relative = 0.0

    def __init__(self, xml: Path, convert: Callable[[], object], precision: str = "f32", inputs=(), static=()) -> None:
        import openvino as ov

        self.precision = precision
        self._core = ov.Core()
        self._xml = xml
        self._core.set_property({"CACHE_DIR": str(self._xml.parent / "compiled")})  # compiled once, then loaded
        if not self._xml.is_file():
            _save(convert, self._xml)
        self._version = ov.__version__
        self._config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                        "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads())}
        self._survives_in_a_child(inputs, static)  # before this process compiles or runs it
        self._model = self._core.compile_model(str(self._xml), "CPU", self._config)
        self._request = self._model.create_infer_request()

    def _survives_in_a_child(self, inputs, static) -> None:
        """Compile and run this graph (as it is, on inputs of the shapes ``inputs``; and compiled for each
        of the shapes in ``static``) once in a child
        process with this model's settings (``casam_core._ov_check``), the first time for this model,
        precision and OpenVINO version; a crash there raises RuntimeError here, and the caller falls
        back to eager PyTorch. A crash inside OpenVINO (a bfloat16 encoder on an AMX Xeon) used to end
        the user's process."""
        import subprocess

        marker = self._xml.with_suffix(f".survived-{self.precision}.json")
        try:
            if json.loads(marker.read_text()).get("openvino") == self._version:
                return
        except (OSError, ValueError, AttributeError):
            pass
        spec = {"config": self._config, "cache": str(self._xml.parent / "compiled"),
                "models": [{"xml": str(self._xml), "reshape": False, "inputs": [list(v) for v in inputs]}]
                + [{"xml": str(self._xml), "reshape": True, "inputs": [list(v) for v in shape]} for shape in static]}
        proc = subprocess.run([*CHECK_COMMAND, json.dumps(spec)], capture_output=True, text=True,
                              env=child_environment(), timeout=CHECK_TIMEOUT_S)
        if proc.returncode != 0:
            how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            last = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()][-1:]
            raise RuntimeError(f"its {self.precision} check crashed OpenVINO in a separate process ({how}"
                               f"{': ' + last[0][:160] if last else ''}); this process was not affected")
        try:
            write_json({"openvino": self._version}, marker)
        except OSError:  # a read-only cache: checked again next time
            pass

    @property
    def _record(self) -> Path:
        suffix = ".verified.json" if self.precision == "f32" else f".verified-{self.precision}.json"
        return self._xml.with_suffix(suffix)

    def verified_difference(self) -> Optional[Tuple[float, float, float]]:
        """(largest output difference, share of agreeing mask pixels, RMS difference relative to
        the reference's RMS) recorded on the probe for this model, precision and OpenVINO version
        (None: not yet)."""
        try:
            record = json.loads(self._record.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(record, dict) and record.get("openvino") == self._version
        values = [record.get(k) for k in ("max_difference", "agreement", "relative_rms")] if ok else []
        return tuple(float(v) for v in values) if values and all(isinstance(v, float) for v in values) else None

    def record_verification(self, diff: float, agreement: float, relative: float) -> None:
        try:
            write_json({"openvino": self._version, "max_difference": diff, "agreement": agreement,
                        "relative_rms": relative}, self._record)
        except OSError:  # a read-only cache: the probe runs again next time
            pass

    def outputs(self, *inputs: torch.Tensor, request=None) -> Tuple[torch.Tensor, ...]:
        """The model's outputs on ``inputs``. The inputs are read in place (``share_inputs``: a
        synchronous call reads them before it returns, and nothing writes them meanwhile); the
        outputs are OpenVINO's own copies (``share_outputs`` off), so they stay valid after later
        calls and are not copied again (a box search's image tokens are tens of MB)."""
        request = request or self._request
        arrays = {i: np.ascontiguousarray(x.detach().cpu().numpy()) for i, x in enumerate(inputs)}
        result = request.infer(arrays, share_inputs=True, share_outputs=False)
        return tuple(torch.from_numpy(result[i]) for i in range(len(self._model.outputs)))


class _OpenVINOEncoder(_OpenVINOModel):
    """The image encoder, converted for one slice at a time (compiled in float32 or bfloat16)."""

    def __init__(self, backbone, precision: str = "f32") -> None:
        size = backbone.img_size
        super().__init__(_ir_path(backbone.fingerprint, str(size), backbone.models_dir), lambda: _convert(
            backbone.image_encoder, torch.zeros(1, 3, size, size)), precision, inputs=[(1, 3, size, size)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            return torch.cat([self(x[i: i + 1]) for i in range(x.shape[0])])
        return self.outputs(x)[0]


class _OpenVINODecoder(_OpenVINOModel):
    """The mask decoder, with any number of objects (B) and prompt tokens (N >= 1) per call; the
    commonest call, one box (B = 1, N = 2: a box click, a propagation step), also runs in a copy
    compiled for that static shape (faster than the dynamic model: ``benchmarks/results/runtime_cpu.md``).
    ``search``: the box search's split decoder (``_OpenVINOSearch``), where it passed its check."""

    search: Optional["_OpenVINOSearch"] = None

    def __init__(self, backbone, precision: str = "f32") -> None:
        import openvino as ov

        c, h, w = backbone.embedding_shape
        example = (torch.zeros(1, c, h, w), torch.zeros(2, 3, c), torch.zeros(2, c, h, w))
        shapes = [ov.PartialShape([1, c, h, w]), ov.PartialShape([-1, -1, c]), ov.PartialShape([-1, c, h, w])]
        xml = _ir_path(backbone.fingerprint, f"decoder-{GRAPHS}", backbone.models_dir)
        first = not xml.is_file()
        one_box_shapes = ([1, c, h, w], [1, 2, c], [1, c, h, w])
        super().__init__(xml, lambda: _convert(decoder_graphs.DecoderGraph(backbone), example, shapes), precision,
                         inputs=[(1, c, h, w), (2, 3, c), (2, c, h, w)], static=[one_box_shapes])
        if first:  # this version's decoder was just converted: earlier versions' are not used again
            _remove_superseded(backbone.fingerprint, backbone.models_dir)
        one_box = self._core.read_model(str(self._xml))
        one_box.reshape({one_box.input(i): ov.PartialShape(shape) for i, shape in enumerate(one_box_shapes)})
        self._one_box = self._core.compile_model(one_box, "CPU", self._config).create_infer_request()

    def __call__(self, z: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        one_box = tuple(sparse.shape[:2]) == (1, 2)
        return self.outputs(z, sparse, dense, request=self._one_box if one_box else None)


class _OpenVINOSearch(_OpenVINOModel):
    """Candidate boxes to choose among (the box search of a click): ``search`` decodes them up to
    the upscaling (``decoder_graphs.SearchGraph``), ``upscale`` makes one candidate's masks (``UpscaleGraph``).
    The upscaling is pixel by pixel (two 2x2 stride-2 transposed convolutions, a channel
    LayerNorm, GELUs), so a candidate's logits at a few pixels need only those pixels' tokens
    (``backbones.Candidates``) and only the chosen candidate is upscaled whole. The commonest
    search, one click's ``SEARCH_CANDIDATES`` boxes, also runs in a copy compiled for that static
    shape (faster, likewise). Called as a decoder (composing the two, for its check against
    eager PyTorch on the probe)."""

    def __init__(self, backbone, precision: str = "f32") -> None:
        import openvino as ov

        c, h, w = backbone.embedding_shape
        example = (torch.zeros(1, c, h, w), torch.zeros(2, 3, c), torch.zeros(1, c, h, w))
        shapes = [ov.PartialShape([1, c, h, w]), ov.PartialShape([-1, -1, c]), ov.PartialShape([1, c, h, w])]
        one_click = ([1, c, h, w], [SEARCH_CANDIDATES, 2, c], [1, c, h, w])
        super().__init__(_ir_path(backbone.fingerprint, f"decoder-search-{GRAPHS}", backbone.models_dir),
                         lambda: _convert(decoder_graphs.SearchGraph(backbone), example, shapes), precision,
                         inputs=[(1, c, h, w), (2, 3, c), (1, c, h, w)], static=[one_click])
        searched = self._core.read_model(str(self._xml))  # the commonest call, compiled for its static shape
        searched.reshape({searched.input(i): ov.PartialShape(shape) for i, shape in enumerate(one_click)})
        self._one_click = self._core.compile_model(searched, "CPU", self._config).create_infer_request()
        m = len(backbone.mask_decoder.output_hypernetworks_mlps)
        hyper = backbone.mask_decoder.output_hypernetworks_mlps[0].layers[-1].out_features
        upscale = _OpenVINOModel(_ir_path(backbone.fingerprint, f"decoder-upscale-{GRAPHS}", backbone.models_dir),
                                 lambda: _convert(decoder_graphs.UpscaleGraph(backbone), (torch.zeros(1, h * w, c),
                                                                            torch.zeros(1, m, hyper))), precision,
                                 inputs=[(1, h * w, c), (1, m, hyper)])
        self._upscale = upscale.outputs

    def search(self, z: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        one_click = tuple(sparse.shape[:2]) == (SEARCH_CANDIDATES, 2)
        return self.outputs(z, sparse, dense[:1], request=self._one_click if one_click else None)

    def upscale(self, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        return self._upscale(keys, hyper)[0]

    def __call__(self, z: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        keys, hyper, iou = self.search(z, sparse, dense)
        return torch.cat([self.upscale(keys[k: k + 1], hyper[k: k + 1]) for k in range(len(keys))]), iou


def models_folder(cache: Optional[os.PathLike] = None) -> Path:
    """Where converted graphs are kept: ``<cache>/encoders`` beside the embeddings of the cache the
    run uses (``cache``, else ``config.cache_dir()``), so that ``--cache-dir`` moves everything."""
    return cache_dir(cache) / "encoders"


def _ir_path(fingerprint: str, part: str, folder: Optional[Path] = None) -> Path:
    """Where a converted graph is kept: ``<folder>/<fingerprint>-<part>.xml`` (part: the encoder's
    input size, or "decoder"; folder: ``models_folder()`` unless given)."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in fingerprint)
    return (folder or models_folder()) / f"{safe}-{part}.xml"


def _remove_superseded(fingerprint: str, folder: Optional[Path] = None) -> None:
    """Remove this backbone's converted decoders of earlier ``GRAPHS`` versions, and OpenVINO's
    compiled copies (kept by a hash of the model: the superseded ones are never read again, the
    current ones are compiled again once). Each version left about 40 MB of models and 100 MB of
    compiled copies in the cache folder, outside the embeddings' size bound. A file another
    process still has open stays readable to it (POSIX); a read-only cache keeps them."""
    current = [_ir_path(fingerprint, f"{part}-{GRAPHS}", folder).stem + "." for part in
               ("decoder", "decoder-search", "decoder-upscale")]
    family = _ir_path(fingerprint, "decoder", folder)
    removed = False
    for path in family.parent.glob(family.stem + "*"):
        if not any(path.name.startswith(stem) for stem in current):
            try:
                path.unlink()
                removed = True
            except OSError:
                pass
    if removed:
        shutil.rmtree(family.parent / "compiled", ignore_errors=True)


def _convert(module: torch.nn.Module, example, shapes=None):
    import openvino as ov

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about the model's code: not the user's concern
        return ov.convert_model(module, example_input=example, input=shapes)


def _save(convert: Callable[[], object], xml: Path) -> None:
    """Convert once and save the model (.xml + .bin) atomically: a crash leaves no half model."""
    import openvino as ov

    xml.parent.mkdir(parents=True, exist_ok=True)
    model = convert()
    tmp = Path(tempfile.mkdtemp(dir=xml.parent, prefix=".converting-"))
    try:
        ov.save_model(model, str(tmp / xml.name), compress_to_fp16=False)
        os.replace(tmp / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
        os.replace(tmp / xml.name, xml)  # the .xml last: it is what marks the model as there
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
