"""Frozen torch models run by ONNX Runtime on the CPU: exported in memory at load time.

Why: on this project's 2-core CPU, onnxruntime ran EfficientNet-Lite0 at ~5 ms per 224 px
image against ~12-16 ms for the same BN-fused, channels_last torch model, and the FER
mini-Xception at 0.9 against 1.5 ms per face; outputs agree to ~1e-5. The graph is
traced from the weights just loaded (~0.3 s) and kept in memory, so no exported file is
cached, trusted or left to go stale. `runtime: auto` picks onnxruntime on the CPU and
torch on CUDA (the onnxruntime package installed here is the CPU build).
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Callable, Sequence

import numpy as np

RUNTIMES = ("auto", "torch", "onnxruntime")


def check_runtime(runtime: str, where: str) -> None:
    """Reject an unknown runtime name at construction, before any model loads."""
    if runtime not in RUNTIMES:
        raise ValueError(f"{where} must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def resolve_runtime(runtime: str, device: str, where: str) -> str:
    """`auto` -> onnxruntime on the CPU, torch elsewhere; onnxruntime off the CPU is an error."""
    check_runtime(runtime, where)
    if runtime == "auto":
        return "onnxruntime" if device == "cpu" else "torch"
    if runtime == "onnxruntime" and device != "cpu":
        raise ValueError(f"{where}: onnxruntime runs on the CPU only here; on {device} use torch or auto")
    return runtime


def _as_module(fn: Callable[[Any], Any], modules: Any) -> Any:
    """`fn` as a torch.nn.Module, which the exporter needs to trace it."""
    import torch

    class Traced(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.held = modules  # registered, so the weights become graph initialisers

        def forward(self, x: Any) -> Any:
            return fn(x)

    return Traced().eval()


class OnnxModel:
    """`fn(x)` (torch, batch-first float32 input) as an onnxruntime session on numpy arrays.

    `input_shape` is one example item's shape without the batch dimension; the batch
    dimension stays dynamic. `outputs` names the tensors `fn` returns, in order.
    """

    def __init__(self, fn: Callable[[Any], Any], modules: Any, input_shape: Sequence[int],
                 outputs: Sequence[str]):
        import onnxruntime as ort
        import torch

        module = _as_module(fn, modules)
        graph = io.BytesIO()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # the TorchScript-based exporter is deprecated in favour of the dynamo one, which
            # needs onnxscript; it traces these fixed-shape CNNs exactly
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros(1, *input_shape),), graph, dynamo=False,
                              input_names=["x"], output_names=list(outputs),
                              dynamic_axes={"x": {0: "batch"}, **{name: {0: "batch"} for name in outputs}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the engine's (and a Ray worker's) setting
        options.inter_op_num_threads = 1
        # No busy-waiting between kernels: the engine's decode threads need those cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only; not its per-node optimiser notices
        self.session = ort.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
        self.outputs = list(outputs)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {"x": np.ascontiguousarray(x, dtype=np.float32)})
