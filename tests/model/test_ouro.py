"""Loading an Ouro checkpoint into LoopLM reproduces the original modeling code's logits.

The fixture (tests/model/fixtures/ouro_tiny, see its README) was written by Ouro's own code, with its
logits at depths 1 and 2 for a fixed batch.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stars.model import LoopLM, OuroCheckpointError, load_ouro, ouro_config_to_looplm, ouro_key_map

OURO_TINY = Path(__file__).parent / "fixtures" / "ouro_tiny"


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(OURO_TINY / "reference.safetensors")


@pytest.fixture(scope="module")
def model() -> LoopLM:
    return load_ouro(OURO_TINY).eval()


def ouro_config() -> dict:
    return json.loads((OURO_TINY / "config.json").read_text())


def checkpoint_with(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """An Ouro checkpoint directory with the fixture's config and the given tensors."""
    shutil.copy(OURO_TINY / "config.json", tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("depth", [1, 2])
def test_logits_match_the_original_code(model, reference, depth):
    with torch.no_grad():
        logits = model(reference["input_ids"], depth=depth).logits
    assert logits.dtype == torch.float32
    assert (logits - reference[f"logits_depth_{depth}"]).abs().max().item() <= 1e-4


def test_depths_differ_so_the_comparison_has_teeth(reference):
    # The loop norm and sandwich norms matter: depth 1 and 2 logits are far apart.
    assert (reference["logits_depth_1"] - reference["logits_depth_2"]).abs().max().item() > 1e-2


def test_forward_depths_equals_separate_calls(model, reference):
    ids = reference["input_ids"]
    readout = model.forward_depths(ids, [1, 2])
    with torch.no_grad():
        for depth in (1, 2):
            torch.testing.assert_close(readout.logits_at(depth), model(ids, depth=depth).logits)


def test_config_translation():
    config = ouro_config_to_looplm(ouro_config())
    assert (config.d_model, config.n_block, config.n_prelude, config.n_coda) == (64, 2, 0, 0)
    assert (config.n_heads, config.n_kv_heads, config.d_ff, config.vocab_size) == (4, 4, 128, 97)
    assert (config.rope_theta, config.norm_eps, config.default_depth) == (10000.0, 1e-6, 4)
    assert (config.norm_type, config.norm_position, config.loop_norm, config.mlp) == (
        "rmsnorm", "pre_sandwich", True, "swiglu"
    )
    assert config.exit_gate and not config.tie_word_embeddings
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)


def test_mislabelled_special_ids_are_replaced_and_distinct_ones_kept():
    mislabelled = {**ouro_config(), "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    assert ouro_config_to_looplm(mislabelled).eos_token_id == 2
    distinct = {**ouro_config(), "pad_token_id": 5, "bos_token_id": 6, "eos_token_id": 7}
    config = ouro_config_to_looplm(distinct)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (5, 6, 7)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_settings_are_refused_by_key(change, key):
    with pytest.raises(ValueError, match=key):
        ouro_config_to_looplm({**ouro_config(), **change})


def test_key_map_covers_every_checkpoint_tensor_and_parameter(model):
    key_map = ouro_key_map(2)
    assert set(key_map) == set(load_file(OURO_TINY / "model.safetensors"))
    assert set(key_map.values()) == set(model.state_dict())


def test_renamed_tensor_is_refused_by_name(tmp_path):
    tensors = load_file(OURO_TINY / "model.safetensors")
    tensors["model.layers.1.mlp.gate_projection.weight"] = tensors.pop("model.layers.1.mlp.gate_proj.weight")
    with pytest.raises(OuroCheckpointError) as refused:
        load_ouro(checkpoint_with(tmp_path, tensors))
    message = str(refused.value)
    assert "missing: model.layers.1.mlp.gate_proj.weight" in message
    assert "unexpected: model.layers.1.mlp.gate_projection.weight" in message


def test_missing_and_misshaped_tensors_are_refused_by_name(tmp_path):
    tensors = load_file(OURO_TINY / "model.safetensors")
    del tensors["model.norm.weight"]
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :32].contiguous()
    with pytest.raises(OuroCheckpointError) as refused:
        load_ouro(checkpoint_with(tmp_path, tensors))
    message = str(refused.value)
    assert "missing: model.norm.weight" in message
    assert "mis-shaped: lm_head.weight is (97, 32)" in message


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, model):
    tensors = load_file(OURO_TINY / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, tmp_path / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(OURO_TINY / "config.json", tmp_path / "config.json")
    sharded = load_ouro(tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], tensor, rtol=0, atol=0)


# ---- saving back in Ouro's layout ---------------------------------------------------------------------
def test_save_round_trips_names_shapes_values_and_config_keys(tmp_path, model):
    from stars.model import save_model

    save_model(model, tmp_path)
    original, saved = load_file(OURO_TINY / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == ouro_config()  # same keys, same values: nothing of LoopLM's leaks in


def test_save_writes_the_current_architecture_and_dtype(tmp_path):
    from stars.model import save_model

    half = load_ouro(OURO_TINY, torch.bfloat16)
    save_model(half, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["dtype"] == "bfloat16" and written["model_type"] == "ouro"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "model.safetensors").values())
    again = load_ouro(tmp_path)
    assert again.embed_tokens.weight.dtype == torch.bfloat16


def test_sharded_save_writes_an_index_and_loads_back(tmp_path, model, monkeypatch):
    import stars.model.ouro as ouro
    from stars.model import save_model

    monkeypatch.setattr(ouro, "_MAX_SHARD", "40KB")  # the fixture is ~230 KB: several shards
    save_model(model, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    again = load_ouro(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_a_model_not_loaded_from_ouro_is_saved_as_a_looplm(tmp_path):
    from stars.model import LoopLMConfig, load_pretrained, save_model

    small = LoopLM(LoopLMConfig(vocab_size=20, d_model=16, n_heads=2, d_ff=32, n_block=1))
    save_model(small, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == LoopLMConfig.model_type
    assert isinstance(load_pretrained(tmp_path), LoopLM)


# ---- the exit gate -----------------------------------------------------------------------------------
def _reference_exit_probs(model: LoopLM, states: list[torch.Tensor]) -> torch.Tensor:
    """Ouro's definition written out step by step in float64 (docs/science.md, section 6)."""
    lam = [torch.sigmoid(model.exit_gate.double()(h.double()).squeeze(-1)) for h in states]
    model.exit_gate.float()
    probs, survive = [], torch.ones_like(lam[0])
    for t, lam_t in enumerate(lam):
        if t == len(lam) - 1:
            probs.append(survive.clone())
        else:
            probs.append(lam_t * survive)
            survive = survive * (1 - lam_t)
    return torch.stack(probs)


@pytest.mark.parametrize("depth", [1, 3, 8])
def test_exit_probabilities_follow_ouros_definition_and_sum_to_one(model, depth):
    torch.manual_seed(depth)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    run = model.run_loop(ids, depth=depth, keep_states=True)
    probs = model.exit_probabilities(run.states)
    assert probs.shape == (depth, 2, 9)
    assert torch.allclose(probs.double(), _reference_exit_probs(model, run.states), atol=1e-6)
    assert torch.allclose(probs.sum(0), torch.ones(2, 9), atol=1e-6)
    assert (probs >= 0).all()
    if depth > 1:  # a real distribution over steps, not all mass on one
        assert probs.max() < 1 - 1e-3
    out = model(ids, depth=depth)
    assert torch.allclose(out.exit_probs, probs, atol=1e-6)
    readout = model.forward_depths(ids, depths=[depth])
    assert torch.allclose(readout.exit_probs, probs, atol=1e-6)


def test_gate_weighted_ce_matches_a_per_step_reference_and_trains_the_gate(model):
    from stars.objective import gate_weighted_ce, stars_loss

    torch.manual_seed(0)
    trained = load_ouro(OURO_TINY).train()
    ids = torch.randint(3, 97, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt without loss
    depth = 3
    run = trained.run_loop(ids, depth=depth, keep_states=True)
    got = gate_weighted_ce(trained, run, labels)
    # reference: for each step, per-token CE in float64, weighted by that step's exit probability
    probs = _reference_exit_probs(trained, run.states)[:, :, :-1]
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(2):
            for i in range(9):
                if labels[b, i + 1] == -100:
                    continue
                count += 1
                for t, h in enumerate(run.states):
                    ce = -torch.log_softmax(trained._head(h)[b, i].double(), -1)[labels[b, i + 1]]
                    total += float(probs[t, b, i] * ce)
    assert got.item() == pytest.approx(total / count, rel=1e-5)
    loss = stars_loss(trained, ids, labels, depth=depth, jsrr_weight=0.0, ce_loss="gate_weighted")
    loss.total.backward()
    assert trained.exit_gate.weight.grad is not None and trained.exit_gate.weight.grad.abs().sum() > 0
    trained.zero_grad(set_to_none=True)
    stars_loss(trained, ids, labels, depth=depth, jsrr_weight=0.0).total.backward()
    assert trained.exit_gate.weight.grad is None  # last-step CE never touches the gate


@pytest.mark.parametrize("depth", [1, 4, 8])
def test_cached_generation_equals_full_recompute(model, depth):
    """Greedy decoding with the per-(step, layer) KV cache picks what recomputing the whole
    sequence at every new token picks, for Ouro's layout (loop norm, RoPE, no injection)."""
    torch.manual_seed(depth)
    prompt = torch.randint(3, 97, (2, 6))
    cached = model.generate_greedy(prompt, depth=depth, max_new_tokens=8)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            nxt = model(seq, depth=depth).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq[:, prompt.shape[1]:])


# ---- load_pretrained: one entry point for LoopLM and Ouro directories and hub ids ----------------------
def test_load_pretrained_dispatches_on_model_type(model, tmp_path):
    from stars.model import PretrainedModelError, load_pretrained

    ouro = load_pretrained(OURO_TINY)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ouro.state_dict()[name], tensor), name
    llama, empty = tmp_path / "llama", tmp_path / "empty"
    llama.mkdir(), empty.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PretrainedModelError, match=r"model_type 'llama'; expected one of stars_looplm, ouro"):
        load_pretrained(llama)
    with pytest.raises(PretrainedModelError, match="not a model directory: no config.json"):
        load_pretrained(empty)


def test_a_hub_id_is_fetched_into_the_hub_cache(monkeypatch, tmp_path):
    """The hub cannot be reached here: `snapshot_download` is replaced by a copy of the fixture,
    and the test checks what the loader asks of it."""
    import huggingface_hub

    from stars.model import PretrainedModelError, load_pretrained

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        if repo_id != "ByteDance/Ouro-Tiny":
            raise huggingface_hub.errors.RepositoryNotFoundError(f"404 Client Error: {repo_id}")
        target = tmp_path / "snapshot"
        shutil.copytree(OURO_TINY, target, dirs_exist_ok=True)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_pretrained("ByteDance/Ouro-Tiny")
    assert loaded.config.n_block == 2 and calls[0][0] == "ByteDance/Ouro-Tiny"
    assert "*.safetensors" in calls[0][1] and "*.py" not in calls[0][1]  # never remote code
    with pytest.raises(PretrainedModelError, match=r"'nobody/none' is not a local directory and could not be fetched"):
        load_pretrained("nobody/none")


@pytest.mark.parametrize("mode", ["vjp", "jvp", "fd"])
def test_jsrr_on_ouros_map_equals_the_explicit_jacobian(model, mode):
    """JSRR runs on Ouro's Phi(h) = norm(layers(h)) (loop norm inside the block) as on any LoopLM:
    ||J^T v||^2 (vjp) or ||J v||^2 (jvp, fd) against the explicit Jacobian, in float64."""
    from stars.objective import jsrr_penalty, random_unit_like

    m = load_ouro(OURO_TINY).double().eval()
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    run = m.run_loop(ids, depth=3)
    h, f = run.h.detach(), m.block_fn(run)
    J = torch.autograd.functional.jacobian(f, h).reshape(h.numel(), h.numel())
    v = random_unit_like(h, torch.Generator().manual_seed(7)).reshape(-1)
    want = float(((J.T if mode == "vjp" else J) @ v).pow(2).sum())
    got = float(jsrr_penalty(f, h, mode, 1, torch.Generator().manual_seed(7)))
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-6 if mode != "fd" else 1e-4)
