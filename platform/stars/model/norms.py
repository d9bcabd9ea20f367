"""Normalization layers and the switch that makes them safe for Jacobian products.

Fast path: PyTorch's fused `F.layer_norm` / `F.rms_norm` and the fused SDPA kernels.
Jacobian path (`jacobian_safe()`): torch 2.13's fused CPU attention kernel has neither a
double-backward nor a forward-AD formula, so attention uses SDPA's MATH backend; and torch 2.13
computes WRONG parameter gradients of a forward-mode (JVP) product through `F.layer_norm` (with or
without affine parameters), so with `forward_mode=True` LayerNorm is computed from mean/var ops.
Reverse mode (double backward) through `F.layer_norm` is correct and keeps the fused op (~20% faster).
Only the one extra block application of the JSRR penalty runs there; the main pass keeps its speed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_COMPOSITE_LAYER_NORM = contextvars.ContextVar("stars_composite_layer_norm", default=False)


@contextlib.contextmanager
def jacobian_safe(forward_mode: bool = True) -> Iterator[None]:
    """Run LoopLM code with ops whose JVPs (`forward_mode`) or double-backwards are correct."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    token = _COMPOSITE_LAYER_NORM.set(forward_mode)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _COMPOSITE_LAYER_NORM.reset(token)


def composite_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """LayerNorm from elementary ops (biased variance, like `F.layer_norm`)."""
    mean = x.mean(-1, keepdim=True)
    centered = x - mean
    var = centered.pow(2).mean(-1, keepdim=True)
    y = centered * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class Norm(nn.Module):
    """One of the paper's three norm types.

    - `layernorm`: affine LayerNorm (gain and bias)
    - `rmsnorm`: RMSNorm with a learned gain
    - `simplenorm`: LayerNorm with no learnable parameters
    """

    def __init__(self, d_model: int, norm_type: str, eps: float):
        super().__init__()
        self.norm_type = norm_type
        self.eps = eps
        self.d_model = d_model
        if norm_type in ("layernorm", "rmsnorm"):
            self.weight = nn.Parameter(torch.ones(d_model))
        else:
            self.register_parameter("weight", None)
        if norm_type == "layernorm":
            self.bias = nn.Parameter(torch.zeros(d_model))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_type == "rmsnorm":
            return F.rms_norm(x, (self.d_model,), self.weight, self.eps)
        if _COMPOSITE_LAYER_NORM.get():
            return composite_layer_norm(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d_model}, type={self.norm_type}, eps={self.eps}"
