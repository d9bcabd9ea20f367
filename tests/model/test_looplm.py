"""LoopLM behaviour: per-call depth, one-pass all-depth readout, cached generation, save/load, config errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from stars.model import LoopLM, LoopLMConfig

VARIANTS = {
    "addition": dict(injection="add", positions="learned"),
    "rope_prelude_coda": dict(
        positions="rope", n_prelude=1, n_coda=1, injection="linear", mlp="swiglu", n_kv_heads=2,
        tie_word_embeddings=False,
    ),
    "ouro_layout": dict(
        norm_type="rmsnorm", norm_position="pre_sandwich", loop_norm=True, positions="rope", mlp="swiglu",
        attn_bias=False, mlp_bias=False, tie_word_embeddings=False, exit_gate=True,
    ),
}


def tiny(seed=0, **kw) -> LoopLM:
    torch.manual_seed(seed)
    base = dict(vocab_size=23, d_model=32, n_heads=4, n_block=2, max_position_embeddings=64, init_std=0.1,
                pad_token_id=0, eos_token_id=1)
    return LoopLM(LoopLMConfig(**{**base, **kw})).eval()


def batch(B=3, T=9, vocab=23, left_pad=(0, 3, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n in enumerate(left_pad[:B]):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_depths_equals_separate_calls(variant):
    model = tiny(**VARIANTS[variant])
    ids, mask = batch()
    readout = model.forward_depths(ids, depths=range(1, 17), attention_mask=mask)
    assert readout.depths == list(range(1, 17))
    for k in (1, 2, 5, 16):
        separate = model(ids, attention_mask=mask, depth=k).logits
        torch.testing.assert_close(readout.logits_at(k), separate, rtol=1e-5, atol=1e-5)


def test_depth_changes_the_output_and_is_per_call():
    model = tiny(**VARIANTS["addition"])
    ids, _ = batch()
    a, b = model(ids, depth=2).logits, model(ids, depth=7).logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(ids, depth=2).logits, a)


def test_trajectory_diagnostics_match_states():
    model = tiny(**VARIANTS["addition"])
    ids, mask = batch()
    ro = model.forward_depths(ids, depths=[1, 2, 3, 8], attention_mask=mask, return_states=True)
    assert ro.states.shape == (4, *ids.shape, 32)
    real = mask.bool()
    per_token = ro.states.norm(dim=-1)[:, real]  # [depths, real tokens]
    torch.testing.assert_close(ro.hidden_norm, per_token.mean(-1))
    # Step size between consecutive requested depths 1,2,3 is ||h_t - h_{t-1}||.
    torch.testing.assert_close(ro.step_size[1], (ro.states[1] - ro.states[0]).norm(dim=-1)[real].mean())
    torch.testing.assert_close(ro.dist_from_start[3], (ro.states[3] - ro.initial_state).norm(dim=-1)[real].mean())


def naive_greedy(model, ids, mask, depth, steps):
    out = []
    for _ in range(steps):
        nxt = model(ids, attention_mask=mask, depth=depth).logits[:, -1].argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("depth", [1, 3, 6])
def test_cached_generation_equals_full_recompute(variant, depth):
    model = tiny(**VARIANTS[variant])
    ids, mask = batch()
    cached = model.generate_greedy(ids, depth=depth, max_new_tokens=8, attention_mask=mask, eos_token_id=-1)
    assert torch.equal(cached, naive_greedy(model, ids, mask, depth, 8))


def test_cached_logits_equal_recompute():
    model = tiny(**VARIANTS["rope_prelude_coda"])
    ids, mask = batch()
    out = model(ids, attention_mask=mask, depth=4, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    step = model(nxt, attention_mask=mask2, depth=4, past_key_values=out.past_key_values).logits[:, -1]
    full = model(torch.cat([ids, nxt], 1), attention_mask=mask2, depth=4).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_shared_prefill_generation_equals_per_depth():
    model = tiny(**VARIANTS["rope_prelude_coda"])
    ids, mask = batch()
    shared = model.generate_greedy_depths(ids, [1, 2, 5, 9], max_new_tokens=6, attention_mask=mask)
    for k, tokens in shared.items():
        assert torch.equal(tokens, model.generate_greedy(ids, depth=k, max_new_tokens=6, attention_mask=mask))


def test_decoding_writes_into_preallocated_caches_without_concatenation(monkeypatch):
    """After the prefill no key/value tensor is concatenated: each depth's cache is reserved for
    prompt + new tokens up front (`LoopCache.reserve`), and tokens are written in place."""
    model = tiny(**VARIANTS["rope_prelude_coda"])
    ids, mask = batch()
    expected = model.generate_greedy_depths(ids, [1, 3, 6], max_new_tokens=6, attention_mask=mask, eos_token_id=-1)
    real_cat, kv_cats = torch.cat, []

    def counting_cat(tensors, dim=0, **kw):
        if dim == 2 and all(t.dim() == 4 for t in tensors):  # [B, heads, tokens, head_dim]
            kv_cats.append(tuple(t.shape for t in tensors))
        return real_cat(tensors, dim=dim, **kw)

    monkeypatch.setattr(torch, "cat", counting_cat)
    got = model.generate_greedy_depths(ids, [1, 3, 6], max_new_tokens=6, attention_mask=mask, eos_token_id=-1)
    assert kv_cats == []
    for k in expected:
        assert torch.equal(got[k], expected[k])


def test_generation_stops_rows_at_eos_and_pads():
    model = tiny(**VARIANTS["addition"])
    ids, mask = batch()
    free = model.generate_greedy(ids, depth=2, max_new_tokens=6, attention_mask=mask, eos_token_id=-1)
    eos = int(free[0, 0])  # pretend row 0's first token is EOS
    stopped = model.generate_greedy(ids, depth=2, max_new_tokens=6, attention_mask=mask, eos_token_id=eos)
    assert stopped[0, 0] == eos
    assert (stopped[0, 1:] == model.config.pad_token_id).all()
    for row in range(1, 3):  # rows that never emit it are untouched up to their first EOS
        n = int((free[row] == eos).nonzero()[0]) + 1 if (free[row] == eos).any() else 6
        assert torch.equal(stopped[row, :n], free[row, :n])


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_round_trip(tmp_path, variant):
    model = tiny(**VARIANTS[variant])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LoopLM)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "stars_looplm"
    ids, mask = batch()
    for k in (1, 4):
        assert torch.equal(loaded(ids, attention_mask=mask, depth=k).logits, model(ids, attention_mask=mask, depth=k).logits)


def test_loss_is_shifted_next_token_ce():
    model = tiny()
    ids, _ = batch(left_pad=())
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels, depth=3)
    logits = out.logits[:, :-1].reshape(-1, 23)
    want = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


def test_truncated_backprop_detaches_early_steps():
    model = tiny(injection="none").train()
    ids, _ = batch(left_pad=())
    full = model(ids, labels=ids, depth=5)
    trunc = model(ids, labels=ids, depth=5, backprop_depth=2)
    torch.testing.assert_close(full.loss, trunc.loss)  # same value
    trunc.loss.backward()
    assert all(p.grad is not None for p in model.block[-1].parameters())


def test_truncated_backprop_blocks_gradient_into_prelude():
    model = tiny(injection="none", n_prelude=1).train()
    ids, _ = batch(left_pad=())
    model(ids, labels=ids, depth=5, backprop_depth=2).loss.backward()
    assert all(p.grad is None for p in model.prelude.parameters())
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, depth=5).loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.prelude.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, _ = batch(left_pad=())
    grads = []
    for ckpt in (False, True):
        model = tiny(**VARIANTS["addition"]).train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids, depth=4).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(norm_type="batchnorm"), "norm_type", "layernorm, rmsnorm, simplenorm"),
        (dict(norm_position="middle"), "norm_position", "pre, post, pre_sandwich, post_sandwich"),
        (dict(n_block=0), "n_block", ">= 1"),
        (dict(d_model=30, n_heads=4), "d_model", "divisible by n_heads"),
        (dict(injection="concat"), "injection", "none, add, linear"),
    ],
)
def test_bad_config_names_field_and_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        LoopLMConfig(**kwargs)
    assert field in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("depth", [0, -1, 2.5])
def test_bad_depth_is_a_value_error(depth):
    model = tiny()
    ids, _ = batch(left_pad=())
    with pytest.raises(ValueError, match="depth"):
        model(ids, depth=depth)


def test_positions_beyond_learned_table_are_a_clear_error():
    model = tiny(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(torch.zeros(1, 9, dtype=torch.long), depth=1)


def test_ouro_layout_is_a_config():
    cfg = LoopLMConfig.ouro_layout()
    assert (cfg.d_model, cfg.n_block, cfg.n_heads, cfg.d_ff, cfg.vocab_size) == (2048, 24, 16, 5632, 49152)
    assert cfg.loop_norm and cfg.norm_position == "pre_sandwich" and cfg.norm_type == "rmsnorm"
    with torch.device("meta"):
        model = LoopLM(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert {"block.0.attn.q_proj.weight", "block.23.mlp.gate_proj.weight", "norm.weight", "lm_head.weight",
            "exit_gate.weight", "block.0.attn_norm_out.weight"} <= names
    assert not any(n.endswith("bias") and ".attn." in n for n in names)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.3e9 < n_params < 1.5e9  # Ouro-1.4B
