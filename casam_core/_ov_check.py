"""Compile and run converted graphs once, in a child process: ``python -m casam_core._ov_check SPEC``.

A crash inside OpenVINO (seen: a segmentation fault running a bfloat16 encoder on an Intel Xeon
with AMX) must not take the user's process down. Before a converted graph is first compiled in
the caller's process, ``runtimes`` runs this program on it with the same settings and random
inputs of the shapes it is called with; only when it ends normally is the graph used.
SPEC is JSON: {"config": {...}, "cache": folder, "models": [{"xml": path, "reshape": compile for these
shapes (true) or as converted (false), "inputs": [[shape of input 0], ...]}]}.
Imports OpenVINO and numpy only (``casam_core`` keeps OpenVINO's telemetry out).
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    import numpy as np
    import openvino as ov

    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    core = ov.Core()
    core.set_property({"CACHE_DIR": spec["cache"]})  # compiled once here, then loaded by the caller
    rng = np.random.default_rng(0)
    for model in spec["models"]:
        graph = core.read_model(model["xml"])
        if model["reshape"]:
            graph.reshape({graph.input(i): ov.PartialShape(s) for i, s in enumerate(model["inputs"])})
        compiled = core.compile_model(graph, "CPU", spec["config"])
        inputs = {i: rng.standard_normal(shape).astype(np.float32) for i, shape in enumerate(model["inputs"])}
        compiled.create_infer_request().infer(inputs)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
