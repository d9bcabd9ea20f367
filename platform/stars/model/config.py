"""`LoopLMConfig`: every architectural choice of a looped LM, validated at construction.

One config covers the STARS addition models, the 12-way norm study and Ouro's layout
(`LoopLMConfig.ouro_layout(...)`), so loading Ouro later is only a weight-name mapping.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

# The choices and the rules across fields are the spec's (one definition for both): a spec that
# validates builds a config, and a config refuses what the spec refuses.
from stars.spec.architecture import (
    INJECTIONS,
    MLPS,
    NORM_POSITIONS,
    NORM_TYPES,
    POSITIONS,
    architecture_problems,
)

__all__ = ["INJECTIONS", "MLPS", "NORM_POSITIONS", "NORM_TYPES", "POSITIONS", "LoopLMConfig"]


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"LoopLMConfig.{field}={value!r} is not allowed; expected one of {', '.join(allowed)}")


def _at_least(field: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ValueError(f"LoopLMConfig.{field}={value!r} must be an integer >= {low}")


class LoopLMConfig(PreTrainedConfig):
    """Configuration of a looped LM: embedding -> prelude -> block x depth -> coda -> norm -> head.

    Depth is NOT part of the architecture: every forward call chooses it. `default_depth` is only
    what `model(input_ids)` uses when the caller gives none.
    """

    model_type = "stars_looplm"

    def __init__(
        self,
        vocab_size: int = 15,
        d_model: int = 128,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        d_ff: int | None = None,
        n_prelude: int = 0,
        n_block: int = 2,
        n_coda: int = 0,
        norm_type: str = "layernorm",
        norm_position: str = "post_sandwich",
        norm_eps: float = 1e-5,
        loop_norm: bool = False,
        injection: str = "none",
        positions: str = "learned",
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 128,
        mlp: str = "gelu",
        attn_bias: bool = True,
        mlp_bias: bool = True,
        dropout: float = 0.0,
        tie_word_embeddings: bool = True,
        embed_init_std: float = 0.02,
        init_std: float = 0.02,
        default_depth: int = 4,
        exit_gate: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.d_ff = 4 * d_model if d_ff is None else d_ff
        self.n_prelude = n_prelude
        self.n_block = n_block
        self.n_coda = n_coda
        self.norm_type = norm_type
        self.norm_position = norm_position
        self.norm_eps = norm_eps
        self.loop_norm = loop_norm
        self.injection = injection
        self.positions = positions
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.mlp = mlp
        self.attn_bias = attn_bias
        self.mlp_bias = mlp_bias
        self.dropout = dropout
        self.embed_init_std = embed_init_std
        self.init_std = init_std
        self.default_depth = default_depth
        self.exit_gate = exit_gate
        self._validate()
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    # transformers reads these generic names (e.g. for device maps and generation utilities).
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.n_prelude + self.n_block + self.n_coda

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def _validate(self) -> None:
        _choice("norm_type", self.norm_type, NORM_TYPES)
        _choice("norm_position", self.norm_position, NORM_POSITIONS)
        _choice("injection", self.injection, INJECTIONS)
        _choice("positions", self.positions, POSITIONS)
        _choice("mlp", self.mlp, MLPS)
        _at_least("vocab_size", self.vocab_size, 1)
        _at_least("d_model", self.d_model, 1)
        _at_least("n_heads", self.n_heads, 1)
        _at_least("n_kv_heads", self.n_kv_heads, 1)
        _at_least("d_ff", self.d_ff, 1)
        _at_least("n_prelude", self.n_prelude, 0)
        _at_least("n_block", self.n_block, 1)
        _at_least("n_coda", self.n_coda, 0)
        _at_least("max_position_embeddings", self.max_position_embeddings, 1)
        _at_least("default_depth", self.default_depth, 1)
        problems = architecture_problems(self.d_model, self.n_heads, self.n_kv_heads, self.positions)
        if problems:
            raise ValueError("; ".join(f"LoopLMConfig.{field}: {message}" for field, message in problems))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoopLMConfig.dropout={self.dropout} must be in [0, 1)")

    @classmethod
    def ouro_layout(cls, **overrides) -> LoopLMConfig:
        """Ouro-1.4B's layout (docs/science.md, section 6) as a LoopLMConfig.

        All 24 layers form the recurrent block; pre_sandwich RMSNorm layers; the final norm is applied
        after every loop step and feeds the next (`loop_norm`); gated SiLU MLP, rotary positions, no
        biases, untied embeddings, the early-exit gate kept so checkpoints load without loss.
        """
        layout = dict(
            vocab_size=49152,
            d_model=2048,
            n_heads=16,
            n_kv_heads=16,
            d_ff=5632,
            n_prelude=0,
            n_block=24,
            n_coda=0,
            norm_type="rmsnorm",
            norm_position="pre_sandwich",
            norm_eps=1e-6,
            loop_norm=True,
            injection="none",
            positions="rope",
            rope_theta=1_000_000.0,
            max_position_embeddings=4096,
            mlp="swiglu",
            attn_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            default_depth=4,
            exit_gate=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        layout.update(overrides)
        return cls(**layout)
