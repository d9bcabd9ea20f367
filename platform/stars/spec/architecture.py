"""The LoopLM architecture rules, in one place: the choices each architecture field offers and the
rules across fields. Used by the spec (`stars.spec.model.LoopLMModel`, at validate time) and by the
model (`stars.model.config.LoopLMConfig`, at construction), so the two cannot disagree.

The rules are pure functions returning `(field, message)` problems; the caller decides how to raise
them (a spec error at `model.<field>`, a ValueError naming `LoopLMConfig.<field>`).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "INJECTIONS",
    "MLPS",
    "NORM_POSITIONS",
    "NORM_TYPES",
    "POSITIONS",
    "Injection",
    "Mlp",
    "NormPosition",
    "NormType",
    "Positions",
    "architecture_problems",
]

NormType = Literal["layernorm", "rmsnorm", "simplenorm"]
NormPosition = Literal["pre", "post", "pre_sandwich", "post_sandwich"]
Injection = Literal["none", "add", "linear"]
Positions = Literal["learned", "rope"]
Mlp = Literal["gelu", "swiglu"]

NORM_TYPES: tuple[str, ...] = get_args(NormType)
NORM_POSITIONS: tuple[str, ...] = get_args(NormPosition)
INJECTIONS: tuple[str, ...] = get_args(Injection)
POSITIONS: tuple[str, ...] = get_args(Positions)
MLPS: tuple[str, ...] = get_args(Mlp)


def architecture_problems(
    d_model: int, n_heads: int, n_kv_heads: int | None, positions: str
) -> list[tuple[str, str]]:
    """Problems of an attention layout as (field, message) pairs; [] when it is valid.

    `n_kv_heads=None` means one key/value head per query head.
    """
    problems: list[tuple[str, str]] = []
    if d_model % n_heads:
        problems.append(
            ("n_heads", f"must divide d_model={d_model} (d_model must be divisible by n_heads), got {n_heads}")
        )
    elif positions == "rope" and (d_model // n_heads) % 2:
        # RoPE rotates pairs of channels inside each head
        problems.append(
            ("n_heads", f"positions 'rope' needs an even head size d_model/n_heads, got {d_model}/{n_heads}")
        )
    if n_kv_heads is not None and n_heads % n_kv_heads:
        # grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads
        problems.append(("n_kv_heads", f"must divide n_heads={n_heads}, got {n_kv_heads}"))
    return problems
