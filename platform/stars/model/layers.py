"""Transformer layer parts of a LoopLM: rotary positions, attention with a KV slot, MLPs, one layer.

A layer's two sublayers (attention, MLP) are wrapped by one of the four norm positions of the paper:
  pre            x = x + f(N(x))
  post           x = N(x + f(x))
  pre_sandwich   x = x + N_out(f(N_in(x)))      (Ouro's layer)
  post_sandwich  x = N_out(x + f(N_in(x)))      (Huginn's block; the STARS choice)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from stars.model.config import LoopLMConfig
from stars.model.norms import Norm

# Which of the two norms (`in` before f, `out` after f or after the residual) each position uses.
_NORMS_OF_POSITION = {
    "pre": (True, False),
    "post": (False, True),
    "pre_sandwich": (True, True),
    "post_sandwich": (True, True),
}


@dataclass
class KVSlot:
    """Cached keys/values of one (loop step, layer), [B, heads, tokens, head_dim].

    Without a reservation a slot grows by `torch.cat` (a new tensor per token). `reserve(capacity)`
    moves it into buffers of `capacity` tokens that later tokens are written into in place, so decoding
    allocates nothing per token. A slot never writes into tensors it did not allocate: caches that
    share a prefill's slots (shared-prefill generation) each reserve their own buffers first.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    _k_buf: torch.Tensor | None = field(default=None, repr=False)
    _v_buf: torch.Tensor | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reserve(self, capacity: int) -> None:
        """Own buffers for `capacity` tokens holding what the slot has cached so far."""
        if self.k is None:
            raise ValueError("reserve needs a filled slot (prefill first): its shape comes from there")
        n = self.length
        if capacity < n:
            raise ValueError(f"capacity {capacity} is below the {n} tokens already cached")
        B, H, _, D = self.k.shape
        self._k_buf = self.k.new_empty(B, H, capacity, D)
        self._v_buf = self.v.new_empty(B, self.v.shape[1], capacity, self.v.shape[3])
        self._k_buf[:, :, :n] = self.k
        self._v_buf[:, :, :n] = self.v
        self.k, self.v = self._k_buf[:, :, :n], self._v_buf[:, :, :n]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, new = self.length, k.shape[2]
        if self._k_buf is not None and n + new <= self._k_buf.shape[2]:
            self._k_buf[:, :, n : n + new] = k
            self._v_buf[:, :, n : n + new] = v
            k, v = self._k_buf[:, :, : n + new], self._v_buf[:, :, : n + new]
        elif self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
            self._k_buf = self._v_buf = None  # outgrown: back to growing by concatenation
        self.k, self.v = k, v
        return k, v


@dataclass
class AttentionContext:
    """What every layer of one forward call shares: masks and positions for the current tokens."""

    attn_mask: torch.Tensor | None  # bool [B, 1, T, S] (True = may attend) or None for plain causal
    position_ids: torch.Tensor  # [B, T]
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin: [B, 1, T, head_dim]
    token_mask: torch.Tensor | None  # bool [B, T]: real (non-pad) tokens, for statistics

    def select(self, rows: torch.Tensor) -> AttentionContext:
        """The same context restricted to a subset of the batch's sequences."""

        def pick(t):
            return None if t is None else t.index_select(0, rows)

        rope = None if self.rope is None else (pick(self.rope[0]), pick(self.rope[1]))
        return AttentionContext(pick(self.attn_mask), pick(self.position_ids), rope, pick(self.token_mask))


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Llama/Ouro-style rotary tables (`rotate_half` convention), shape [B, 1, T, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Causal multi-head attention with grouped KV heads, through `F.scaled_dot_product_attention`."""

    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        d, bias = config.d_model, config.attn_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, kv: KVSlot | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if ctx.rope is not None:
            q, k = apply_rotary(q, *ctx.rope), apply_rotary(k, *ctx.rope)
        if kv is not None:
            k, v = kv.extend(k, v)
        if self.n_kv_heads != self.n_heads:
            # Explicit repeat rather than SDPA's enable_gqa: it works in every backend and AD mode.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=ctx.attn_mask,
            is_causal=ctx.attn_mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """`gelu`: down(gelu(up x)); `swiglu`: down(silu(gate x) * up x) (Ouro's gated SiLU MLP)."""

    def __init__(self, config: LoopLMConfig):
        super().__init__()
        d, f, bias = config.d_model, config.d_ff, config.mlp_bias
        self.gated = config.mlp == "swiglu"
        self.gate_proj = nn.Linear(d, f, bias=bias) if self.gated else None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class LoopLayer(nn.Module):
    """One transformer layer: attention and MLP sublayers under the configured norm position."""

    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.position = config.norm_position
        has_in, has_out = _NORMS_OF_POSITION[config.norm_position]

        def norm(present: bool):
            return Norm(config.d_model, config.norm_type, config.norm_eps) if present else None

        self.attn_norm_in, self.attn_norm_out = norm(has_in), norm(has_out)
        self.mlp_norm_in, self.mlp_norm_out = norm(has_in), norm(has_out)
        self.attn = Attention(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def _residual(self, x: torch.Tensor, f, norm_in: Norm | None, norm_out: Norm | None) -> torch.Tensor:
        if self.position == "pre":
            return x + self.drop(f(norm_in(x)))
        if self.position == "post":
            return norm_out(x + self.drop(f(x)))
        if self.position == "pre_sandwich":
            return x + self.drop(norm_out(f(norm_in(x))))
        return norm_out(x + self.drop(f(norm_in(x))))  # post_sandwich

    def forward(self, x: torch.Tensor, ctx: AttentionContext, kv: KVSlot | None = None) -> torch.Tensor:
        x = self._residual(x, lambda z: self.attn(z, ctx, kv), self.attn_norm_in, self.attn_norm_out)
        return self._residual(x, self.mlp, self.mlp_norm_in, self.mlp_norm_out)
