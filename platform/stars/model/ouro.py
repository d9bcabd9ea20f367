"""Load a Hugging Face Ouro checkpoint (`model_type: ouro`) natively into a `LoopLM`.

Ouro's layout is `LoopLMConfig.ouro_layout()` (docs/science.md, section 6): all layers form the
recurrent block, pre_sandwich RMSNorm layers, the final norm applied after every loop step
(`loop_norm`), gated SiLU MLP, rotary positions, no biases, an early-exit gate. So loading is a
config translation plus a one-to-one renaming of tensors; nothing is converted or re-computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stars.errors import UserError
from stars.model.config import LoopLMConfig
from stars.model.looplm import LoopLM

__all__ = [
    "OURO_CONFIG_ATTR",
    "OuroCheckpointError",
    "is_ouro_derived",
    "load_ouro",
    "looplm_config_to_ouro",
    "ouro_config_to_looplm",
    "ouro_key_map",
    "save_ouro",
]

# The attribute of a LoopLMConfig that holds the Ouro `config.json` it was loaded from: its presence
# makes checkpoints of the model save in Ouro's layout again (`save_ouro`), with the same keys.
OURO_CONFIG_ATTR = "ouro_config"
# Shard size of saved weights: the size transformers and vLLM expect to read shard by shard.
_MAX_SHARD = "5GB"

# Ouro's tokenizer config labels pad, bos and eos all as id 0; these are the real ones
# (<|endoftext|>, <|im_start|>, <|im_end|>, docs/science.md section 6).
_OURO_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# Ouro layer sublayer -> LoopLM layer sublayer (the per-layer part of `ouro_key_map`).
_LAYER_KEYS = {
    "input_layernorm.weight": "attn_norm_in.weight",
    "input_layernorm_2.weight": "attn_norm_out.weight",
    "post_attention_layernorm.weight": "mlp_norm_in.weight",
    "post_attention_layernorm_2.weight": "mlp_norm_out.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


class OuroCheckpointError(UserError):
    """An Ouro checkpoint this loader cannot reproduce exactly (a setting LoopLM lacks, or tensors
    that are missing, unexpected or mis-shaped)."""


def _special_ids(config: dict) -> dict[str, int]:
    """The checkpoint's pad/bos/eos ids when they are three distinct integers, else Ouro's real ones
    (upstream configs carry the mislabelled all-zero ids, or none)."""
    given = {key: config.get(key) for key in _OURO_SPECIAL_IDS}
    ids = list(given.values())
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) and len(set(ids)) == 3:
        return given
    return dict(_OURO_SPECIAL_IDS)


def _unsupported(config: dict) -> list[str]:
    """Settings of an Ouro config that LoopLM cannot reproduce, one line each naming the key."""
    problems = []
    if config.get("model_type", "ouro") != "ouro":
        problems.append(f"model_type={config['model_type']!r}: expected 'ouro'")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r}: LoopLM's gated MLP uses silu only")
    if config.get("rope_scaling") is not None:
        problems.append(f"rope_scaling={config['rope_scaling']!r}: LoopLM implements plain RoPE only (null)")
    if config.get("use_sliding_window", False):
        problems.append("use_sliding_window=true: LoopLM has full causal attention only")
    sliding = [t for t in config.get("layer_types") or [] if t != "full_attention"]
    if sliding:
        problems.append(f"layer_types contains {sorted(set(sliding))}: LoopLM has full causal attention only")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key, False):
            problems.append(f"{key}=true: Ouro's layout has no biases")
    if config.get("attention_dropout", 0.0):
        problems.append(
            f"attention_dropout={config['attention_dropout']}: LoopLM has no attention-only dropout"
        )
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    head_dim = config.get("head_dim")
    both_ints = isinstance(hidden, int) and isinstance(heads, int)
    if head_dim is not None and both_ints and heads * head_dim != hidden:
        problems.append(
            f"head_dim={head_dim}: LoopLM's head_dim is hidden_size/num_attention_heads = {hidden}/{heads}"
        )
    return problems


def ouro_config_to_looplm(config: dict) -> LoopLMConfig:
    """An Ouro `config.json` (as a dict) as the equivalent `LoopLMConfig`.

    Raises `OuroCheckpointError` (a ValueError) naming every key whose value LoopLM cannot reproduce.
    `early_exit_threshold` is an inference policy, not architecture; it is not carried over.
    """
    problems = _unsupported(config)
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    problems += [f"{key}: missing from the Ouro config" for key in required if key not in config]
    if problems:
        raise OuroCheckpointError("unsupported Ouro config:\n" + "\n".join(f"  {p}" for p in problems))
    return LoopLMConfig.ouro_layout(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        d_ff=config["intermediate_size"],
        n_block=config["num_hidden_layers"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=config.get("rope_theta", 1_000_000.0),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        default_depth=config.get("total_ut_steps", 4),
        **_special_ids(config),
    )


def ouro_key_map(n_layers: int, tie_word_embeddings: bool = False) -> dict[str, str]:
    """Ouro tensor name -> LoopLM `state_dict` name, for a model of `n_layers` layers."""
    names = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.norm.weight": "norm.weight",
        "model.early_exit_gate.weight": "exit_gate.weight",
        "model.early_exit_gate.bias": "exit_gate.bias",
    }
    if not tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(n_layers):
        for ouro, ours in _LAYER_KEYS.items():
            names[f"model.layers.{i}.{ouro}"] = f"block.{i}.{ours}"
    return names


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors`, or of the shards a `model.safetensors.index.json` lists."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / shard for shard in shards]
    else:
        files = [directory / "model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise OuroCheckpointError(f"Ouro checkpoint {directory} lacks weight file(s): {', '.join(missing)}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _renamed(tensors: dict[str, torch.Tensor], key_map: dict[str, str], expected: dict[str, torch.Size]):
    """The checkpoint's tensors under LoopLM names; every mismatch is reported at once, by name."""
    problems = []
    for name in sorted(set(key_map) - set(tensors)):
        problems.append(f"missing: {name} (LoopLM {key_map[name]})")
    for name in sorted(set(tensors) - set(key_map)):
        shape = tuple(tensors[name].shape)
        problems.append(f"unexpected: {name} {shape} (no LoopLM parameter takes it)")
    for name in sorted(set(tensors) & set(key_map)):
        want = expected[key_map[name]]
        if tensors[name].shape != want:
            shape = tuple(tensors[name].shape)
            problems.append(f"mis-shaped: {name} is {shape}; the config needs {tuple(want)}")
    if problems:
        listing = "\n".join(f"  {p}" for p in problems)
        raise OuroCheckpointError(f"Ouro checkpoint does not fit its config:\n{listing}")
    return {key_map[name]: tensor for name, tensor in tensors.items()}


def load_ouro(path: str | Path, dtype: torch.dtype | None = None) -> LoopLM:
    """A `LoopLM` holding the Ouro checkpoint in directory `path` (config.json + safetensors), with
    weights in `dtype` (None: as stored).

    Strict: every checkpoint tensor must map onto a LoopLM parameter and every parameter must be in
    the checkpoint, with the right shape; otherwise one `OuroCheckpointError` lists them all.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise OuroCheckpointError(f"{directory} is not an Ouro checkpoint directory: no config.json")
    config = ouro_config_to_looplm(json.loads(config_file.read_text()))
    # Built on the meta device: no random init of weights that are overwritten at once.
    with torch.device("meta"):
        model = LoopLM(config)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    key_map = ouro_key_map(config.n_block, config.tie_word_embeddings)
    state = _renamed(_read_tensors(directory), key_map, expected)
    model.load_state_dict(state, strict=True, assign=True)
    setattr(model.config, OURO_CONFIG_ATTR, json.loads(config_file.read_text()))
    return (model if dtype is None else model.to(dtype)).eval()


def is_ouro_derived(model: LoopLM) -> bool:
    """Whether `model` was loaded from an Ouro checkpoint (and so saves in Ouro's layout)."""
    return isinstance(getattr(model.config, OURO_CONFIG_ATTR, None), dict)


def looplm_config_to_ouro(config: LoopLMConfig, dtype: torch.dtype) -> dict:
    """The Ouro `config.json` for a LoopLM of Ouro's layout: the keys of the config it was loaded
    from, with the architecture values taken from `config` (so a reshaped model stays truthful)."""
    ouro = dict(getattr(config, OURO_CONFIG_ATTR, None) or {})
    ouro.update(
        architectures=["OuroForCausalLM"],
        model_type="ouro",
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_block,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        intermediate_size=config.d_ff,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        total_ut_steps=config.default_depth,
        dtype=str(dtype).removeprefix("torch."),
    )
    ouro.setdefault("hidden_act", "silu")
    return ouro


def save_ouro(model: LoopLM, path: str | Path) -> Path:
    """Write `model` in Ouro's own layout: `config.json` (`model_type: ouro`) and safetensors with
    Ouro's tensor names (sharded above 5 GB, with the standard index), so the original Ouro code and
    vLLM read it. The inverse of `load_ouro`: loading the result gives back the same tensors."""
    from huggingface_hub import split_torch_state_dict_into_shards

    config = model.config
    if not is_ouro_derived(model):
        raise ValueError("save_ouro: the model was not loaded from an Ouro checkpoint (no ouro_config)")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    to_ouro = {ours: theirs for theirs, ours in ouro_key_map(config.n_block, config.tie_word_embeddings).items()}
    ours = model.state_dict()
    if set(ours) != set(to_ouro):
        raise ValueError(f"save_ouro: the model's tensors differ from Ouro's layout: {sorted(set(ours) ^ set(to_ouro))}")
    state = {to_ouro[name]: tensor.detach().contiguous().cpu() for name, tensor in ours.items()}
    dtype = next(iter(state.values())).dtype
    (out / "config.json").write_text(json.dumps(looplm_config_to_ouro(config, dtype), indent=2, sort_keys=True) + "\n")
    split = split_torch_state_dict_into_shards(state, max_shard_size=_MAX_SHARD)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, out / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
