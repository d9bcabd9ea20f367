"""The `model` section: a new LoopLM (`source: looplm`, the architecture fields) or a checkpoint
(`source: pretrained | ouro`, whose architecture comes from the checkpoint). A union on `source`:
a checkpoint has no architecture fields at all, so `d_model` on one is an unknown key. A `model`
section without `source`, or no `model` section, is a default LoopLM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, model_validator

from stars.spec.architecture import Injection, Mlp, NormPosition, NormType, Positions, architecture_problems
from stars.spec.base import Float, Int, Section, cross_error, raise_all
from stars.spec.depths import MAX_DEPTH

__all__ = [
    "CheckpointModel",
    "LoopLMModel",
    "ModelSpec",
    "NormSpec",
    "WeightsDtype",
    "checkpoint_location_problem",
]

WeightsDtype = Literal["float32", "bfloat16", "float16"]

# A Hugging Face hub id: `org/name` (what `model.pretrained` is when it is not a local path).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def checkpoint_location_problem(name: str) -> str | None:
    """Why `model.pretrained` cannot be loaded on this machine, or None: it must be an existing
    directory here or have the form of a hub id. Checked where the job runs (the driver), before
    any cluster time is spent; not at validation, since a cluster's paths need not exist on a laptop."""
    path = Path(name).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"model.pretrained {name!r} is a file; expected a model directory (config.json + weights)"
    if _HUB_ID.match(name):
        return None
    return f"model.pretrained {name!r}: no such directory, and not a Hugging Face hub id (org/name)"



class NormSpec(Section):
    """Normalisation inside the recurrent block (docs/science.md, section 2: 4 positions x 3 types)."""

    type: NormType = "layernorm"
    """`layernorm` (affine LayerNorm), `rmsnorm` (learned gain) or `simplenorm` (LayerNorm without
    gain or bias)."""
    position: NormPosition = "post_sandwich"
    """Where the norms sit around each sublayer f: `pre` x+f(N(x)); `post` N(x+f(x));
    `pre_sandwich` x+N2(f(N1(x))); `post_sandwich` N2(x+f(N1(x))) (the STARS choice)."""
    eps: Float = Field(default=1e-5, gt=0, lt=1)
    """Epsilon of every norm."""


class LoopLMModel(Section):
    """A new LoopLM built from the architecture fields below. `vocab_size` and the pad/bos/eos ids
    come from the task's tokenizer."""

    source: Literal["looplm"] = "looplm"
    """`looplm`: a new LoopLM from this config (the default)."""
    dtype: WeightsDtype = "float32"
    """dtype of the weights (the optimiser's master weights). Keep `float32` and train with
    `train.precision: bf16` (autocast): with bf16 weights most updates round to zero."""
    d_model: Int = Field(default=128, ge=1, le=65536)
    """Hidden size."""
    n_heads: Int = Field(default=4, ge=1, le=1024)
    """Attention heads; must divide d_model."""
    n_kv_heads: Int | None = Field(default=None, ge=1, le=1024)
    """Key/value heads (grouped-query attention); must divide n_heads; null = n_heads."""
    d_ff: Int | None = Field(default=None, ge=1, le=262144)
    """MLP inner size; null = 4 * d_model."""
    n_prelude: Int = Field(default=0, ge=0, le=256)
    """Layers before the loop, applied once."""
    n_block: Int = Field(default=2, ge=1, le=256)
    """Layers in the shared recurrent block applied `depth` times."""
    n_coda: Int = Field(default=0, ge=0, le=256)
    """Layers after the loop, applied once."""
    norm: NormSpec = Field(default_factory=NormSpec)
    """Norm type, position and eps inside the block."""
    loop_norm: bool = False
    """Apply the final norm after every loop step and feed it to the next (Ouro's layout)."""
    injection: Injection = "none"
    """Input injection before each loop step: `none`, `add` (h + e) or `linear` (W[h; e])."""
    positions: Positions = "learned"
    """Position encoding: `learned` embeddings or `rope`."""
    rope_theta: Float = Field(default=10000.0, gt=0, le=1e9)
    """RoPE base."""
    max_position_embeddings: Int = Field(default=128, ge=1, le=1_048_576)
    """Longest sequence the model accepts; must cover the task's sequences when positions are
    learned."""
    mlp: Mlp = "gelu"
    """MLP kind: `gelu` or gated `swiglu`."""
    attn_bias: bool = True
    """Bias in the attention projections."""
    mlp_bias: bool = True
    """Bias in the MLP projections."""
    dropout: Float = Field(default=0.0, ge=0, lt=1)
    """Dropout probability."""
    tie_word_embeddings: bool = True
    """Share the embedding matrix with the LM head."""
    embed_init_std: Float = Field(default=0.02, gt=0, le=10)
    """Std of the embedding initialisation (N(0, 1) makes pre-norm models stall)."""
    init_std: Float = Field(default=0.02, gt=0, le=10)
    """Std of the other weights' initialisation."""
    default_depth: Int = Field(default=4, ge=1, le=MAX_DEPTH)
    """Depth used when a forward call gives none. Training depth comes from
    `stars.loop_sampling`, evaluation depths from `eval.depths`."""
    exit_gate: bool = False
    """Keep an Ouro-style early-exit gate."""

    @model_validator(mode="after")
    def _check(self) -> LoopLMModel:
        problems = architecture_problems(self.d_model, self.n_heads, self.n_kv_heads, self.positions)
        raise_all(
            "LoopLMModel",
            [cross_error((name,), message, getattr(self, name)) for name, message in problems],
        )
        return self

    @classmethod
    def unknown_key_message(cls, key: str, tag: str | None) -> str | None:
        if key in CheckpointModel.model_fields:
            return (
                "only for model.source 'pretrained' or 'ouro'; a 'looplm' model is built new from the "
                "architecture fields"
            )
        return None

    def looplm_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `stars.model.LoopLMConfig` (names as in docs/interfaces.md).

        Leaves out vocab_size and the pad/bos/eos ids (the task supplies them) and `dtype` (how the
        weights are stored, not the architecture). `n_kv_heads`/`d_ff` may be None (LoopLMConfig
        derives them).
        """
        kwargs = self.model_dump(exclude={"source", "dtype", "norm"})
        kwargs.update(norm_type=self.norm.type, norm_position=self.norm.position, norm_eps=self.norm.eps)
        return kwargs


class CheckpointModel(Section):
    """A saved model whose architecture comes from the checkpoint itself: `pretrained` (a LoopLM
    saved by this platform) or `ouro` (an Ouro checkpoint)."""

    source: Literal["pretrained", "ouro"]
    """`pretrained`: a LoopLM saved by this platform (a `save_pretrained` directory); `ouro`: an
    Ouro checkpoint (directory or hub id)."""
    pretrained: str = Field(min_length=1)
    """Checkpoint directory or hub id."""
    trust_remote_code: bool = False
    """Allow the checkpoint's (and its tokenizer's) own Python code (transformers
    `trust_remote_code`). Off by default: the platform's loaders do not need it."""
    dtype: WeightsDtype = "float32"
    """dtype of the weights (the optimiser's master weights). Keep `float32` and train with
    `train.precision: bf16` (autocast): with bf16 weights most updates at lr ~1e-6 round to zero."""

    @classmethod
    def unknown_key_message(cls, key: str, tag: str | None) -> str | None:
        if key in LoopLMModel.model_fields:
            source = f"model.source is {tag!r}" if tag else "the model is a checkpoint"
            return f"the architecture comes from the checkpoint when {source}; remove this key"
        return None


def _looplm_by_default(value: Any) -> Any:
    # `model: {d_model: 64}` (no source) is a LoopLM, as it was before the union existed
    if isinstance(value, Mapping) and "source" not in value:
        return {**value, "source": "looplm"}
    return value


ModelSpec = Annotated[
    Union[LoopLMModel, CheckpointModel],  # noqa: UP007 - the form pydantic documents for unions
    Field(discriminator="source"),
    BeforeValidator(_looplm_by_default),
]
"""The model: a new LoopLM (`source: looplm`, the default) or a checkpoint (`pretrained`, `ouro`)."""
