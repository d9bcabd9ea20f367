"""Each of the 12 (norm type x position) structures computes exactly its formula on a one-layer block.

The reference below is written from elementary ops (explicit softmax attention, LayerNorm from
mean/var), independent of the layer code's fused kernels and its residual dispatch.
"""

import math

import pytest
import torch

from stars.model import NORM_POSITIONS, NORM_TYPES, LoopLMConfig
from stars.model.layers import AttentionContext, LoopLayer


def ref_norm(x, norm):
    if norm.norm_type == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    if norm.norm_type == "layernorm":
        y = y * norm.weight + norm.bias
    return y


def ref_attention(x, attn, n_heads):
    B, T, D = x.shape
    hd = D // n_heads

    def heads(t):
        return t.view(B, T, n_heads, hd).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, D))


def ref_mlp(x, mlp):
    return mlp.down_proj(torch.nn.functional.gelu(mlp.up_proj(x)))


def ref_layer(x, layer, position, n_heads):
    def sub(x, f, n_in, n_out):
        if position == "pre":
            return x + f(ref_norm(x, n_in))
        if position == "post":
            return ref_norm(x + f(x), n_out)
        if position == "pre_sandwich":
            return x + ref_norm(f(ref_norm(x, n_in)), n_out)
        assert position == "post_sandwich"
        return ref_norm(x + f(ref_norm(x, n_in)), n_out)

    x = sub(x, lambda z: ref_attention(z, layer.attn, n_heads), layer.attn_norm_in, layer.attn_norm_out)
    return sub(x, lambda z: ref_mlp(z, layer.mlp), layer.mlp_norm_in, layer.mlp_norm_out)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("position", NORM_POSITIONS)
def test_layer_matches_its_formula(norm_type, position):
    torch.manual_seed(0)
    cfg = LoopLMConfig(d_model=16, n_heads=2, norm_type=norm_type, norm_position=position)
    layer = LoopLayer(cfg).double()
    # Non-trivial norm parameters, so a swapped or missing norm shows up.
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ctx = AttentionContext(None, torch.arange(5).expand(2, 5), None, None)
    got = layer(x, ctx)
    want = ref_layer(x, layer, position, n_heads=2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("position", NORM_POSITIONS)
def test_norm_parameters_present_per_position(position):
    layer = LoopLayer(LoopLMConfig(d_model=8, n_heads=2, norm_position=position))
    has_in = layer.attn_norm_in is not None
    has_out = layer.attn_norm_out is not None
    assert (has_in, has_out) == {
        "pre": (True, False),
        "post": (False, True),
        "pre_sandwich": (True, True),
        "post_sandwich": (True, True),
    }[position]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norm_types_parameters(norm_type):
    layer = LoopLayer(LoopLMConfig(d_model=8, n_heads=2, norm_type=norm_type))
    names = {n for n, _ in layer.attn_norm_in.named_parameters()}
    assert names == {"layernorm": {"weight", "bias"}, "rmsnorm": {"weight"}, "simplenorm": set()}[norm_type]
