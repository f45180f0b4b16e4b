"""The Alignment Layer: a small per-task network between the frozen encoder and decoder.

Paper form (method.md): ``A = 3 x CAResBlock(256 -> 256)``, the same LayerNorm2d
(one module, shared weights, eps 1e-6) after every block, PyTorch default init.

    CAResBlock(x): y = conv3x3(ReLU(conv3x3(ReLU(x))))
                   w = sigmoid(conv1d_k5(GAP(y)))      # ECA channel attention
                   return y * w + x

Identity-gated form: ``Z + g * (A(Z) - Z)`` with a per-channel gate ``g``
initialised at 0, so an untrained layer is exactly the frozen model. Its convolutions get
zero gradient while ``g`` is 0 and Adam grows ``g`` by about lr per step, so it moves
away from frozen only slowly (docs/benchmarks.md, "Choosing the learning recipe").

Residual form (our choice, the default of ``casam learn`` and the plugin): the same three
CAResBlocks with the shared LayerNorm moved into the branch (pre-norm),

    x_k = x_(k-1) + CA(LN(x_(k-1))),   CA(u) = y * eca(y),  y = conv2(ReLU(conv1(ReLU(u))))

and ``conv2`` of every block zero-initialised: an untrained layer is exactly the frozen
model, ``conv2`` gets a gradient at step 0 and every other weight from step 1, so the
layer moves at the optimiser's full rate. Same parameter count as the paper form.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from segment_anything.modeling.common import LayerNorm2d  # SAM's channel LayerNorm
from torch import nn

from .errors import OptionError, look_up_option

FORMS = PAPER, GATED, RESIDUAL = ("paper", "gated", "residual")
MAX_BLOCKS = 16  # the most CA-ResBlocks a layer may have (a task card beyond it is refused)


class ECA(nn.Module):
    """Efficient channel attention: a 1-D convolution (k=5) across the pooled channels."""

    def __init__(self, kernel_size: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        pooled = y.mean(dim=(2, 3))  # (B, C)
        return torch.sigmoid(self.conv(pooled[:, None, :]))[:, 0, :, None, None]


class CAResBlock(nn.Module):
    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.act = nn.ReLU()
        self.eca = ECA(5)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act(self.conv1(self.act(x))))
        return y * self.eca(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + x


class AlignmentLayer(nn.Module):
    """``n_blocks`` CAResBlocks, each followed by one shared LayerNorm2d.

    ``form="paper"``: exactly the paper's layer. ``form="gated"``: the same layer
    wrapped as ``Z + g * (A(Z) - Z)`` with a learnable per-channel ``g`` started at 0.
    ``form="residual"``: pre-norm blocks ``x + CA(LN(x))`` with each block's last
    convolution started at zero (identity at step 0, gradients to every weight).
    """

    def __init__(self, channels: int = 256, n_blocks: int = 3, form: str = "paper") -> None:
        super().__init__()
        look_up_option(form, FORMS, "Alignment Layer form")
        if n_blocks < 1:
            raise OptionError("an Alignment Layer needs at least one block")
        self.channels = channels
        self.n_blocks = n_blocks
        self.form = form
        self.blocks = nn.ModuleList(CAResBlock(channels) for _ in range(n_blocks))
        self.norm = LayerNorm2d(channels, eps=1e-6)  # shared by every block
        if form == "gated":
            self.gate = nn.Parameter(torch.zeros(channels))
        if form == "residual":
            for block in self.blocks:
                nn.init.zeros_(block.conv2.weight)
                nn.init.zeros_(block.conv2.bias)

    def config(self) -> Dict[str, Any]:
        return {"channels": self.channels, "n_blocks": self.n_blocks, "form": self.form}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "AlignmentLayer":
        return cls(channels=int(config["channels"]), n_blocks=int(config["n_blocks"]), form=str(config["form"]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        if self.form == "residual":
            for block in self.blocks:
                x = x + block.branch(self.norm(x))
            return x
        for block in self.blocks:
            x = self.norm(block(x))
        if self.form == "gated":
            return z + self.gate[None, :, None, None] * (x - z)
        return x


def run_layer(layer: nn.Module, z: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``layer(z)`` for inference (gradients off), float32 out: on the CPU under ``dtype``'s autocast
    when one is given (``Backbone.layer_dtype``: bfloat16 where the decoder runs in bfloat16, the
    arithmetic a learning step's forward pass already uses there), else in the tensor's own type.
    The one way a learned layer is applied in use and in its held-out checks. Its six 3x3
    convolutions at 64 x 64 positions are the cost of a slice's learned features (about half the
    time in bfloat16 on a CPU that computes it natively: ``benchmarks/results/layer_arithmetic_cpu.md``)."""
    if dtype is None or dtype == torch.float32 or z.device.type != "cpu":
        return layer(z)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(z)
    return out.float()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
