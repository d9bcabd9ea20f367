"""The LoopLM: a transformers model whose shared block runs a per-call number of times."""

from transformers import AutoConfig, AutoModelForCausalLM

from stars.model.config import NORM_POSITIONS, NORM_TYPES, LoopLMConfig
from stars.model.looplm import DepthReadout, LoopCache, LoopLM, LoopRun, causal_lm_loss
from stars.model.norms import jacobian_safe
from stars.model.ouro import (
    OuroCheckpointError,
    is_ouro_derived,
    load_ouro,
    looplm_config_to_ouro,
    ouro_config_to_looplm,
    ouro_key_map,
    save_ouro,
)
from stars.model.pretrained import PretrainedModelError, load_pretrained, resolve_model_dir, save_model

AutoConfig.register(LoopLMConfig.model_type, LoopLMConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopLMConfig, LoopLM, exist_ok=True)

__all__ = [
    "NORM_POSITIONS",
    "NORM_TYPES",
    "DepthReadout",
    "LoopCache",
    "LoopLM",
    "LoopLMConfig",
    "LoopRun",
    "OuroCheckpointError",
    "PretrainedModelError",
    "causal_lm_loss",
    "is_ouro_derived",
    "jacobian_safe",
    "load_ouro",
    "load_pretrained",
    "looplm_config_to_ouro",
    "ouro_config_to_looplm",
    "ouro_key_map",
    "resolve_model_dir",
    "save_model",
    "save_ouro",
]
