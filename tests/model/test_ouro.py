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
