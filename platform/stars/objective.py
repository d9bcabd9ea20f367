"""The STARS objective: the JSRR penalty and the combined loss (the loop samplers are the spec's).

    loss = (1 - lambda) * CE(depth t) + lambda * ||J v||^2,   t ~ LoopSampler,  lambda = 0.1 (paper)

J is the Jacobian of one more application of the shared block Phi at the detached final state h*, v a
random unit vector over the whole state tensor; `||J v||^2` (or `||J^T v||^2`) is one power-iteration
step towards the Jacobian's spectral radius and, for isotropic v, equals ||J||_F^2 / numel(h) in
expectation. The penalty's gradient reaches Phi's parameters only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, get_args

import torch
import torch.nn.functional as F

from stars.model.looplm import LoopLM, LoopRun, causal_lm_loss
from stars.model.norms import jacobian_safe
from stars.spec.stars import CeLoss, JsrrMode  # the spec's choices, defined once

BlockFn = Callable[[torch.Tensor], torch.Tensor]
JSRR_MODES: tuple[str, ...] = get_args(JsrrMode)


# ---- loop samplers ------------------------------------------------------------------------------------
class LoopSampler(Protocol):
    """Depth for a training step. A pure function of (seed, step): every DDP rank draws the same depth
    in a step without communicating, and a resumed run continues the same depth sequence.

    The samplers are the spec's models (`stars.spec.stars`: fixed, lognormal, poisson_lognormal,
    uniform); `sampling.bind(seed)` gives this callable (`stars.train.build_sampler`)."""

    @property
    def backprop_depth(self) -> int | None: ...

    def __call__(self, step: int) -> int: ...


# ---- Jacobian products ----------------------------------------------------------------------------------
def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp(min=torch.finfo(x.dtype).tiny)


def random_unit_like(h: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """v ~ N(0, I) of h's shape, scaled to unit norm over the whole tensor."""
    device = h.device if generator is None else generator.device
    return _unit(torch.randn(h.shape, generator=generator, dtype=h.dtype, device=device).to(h.device))


def jacobian_vector_product(
    block_fn: BlockFn, h: torch.Tensor, v: torch.Tensor, mode: JsrrMode, create_graph: bool
) -> torch.Tensor:
    """u = J v (modes 'jvp', 'fd') or u = J^T v (mode 'vjp'), J = dPhi/dh at h.

    - `vjp`: reverse mode, autograd.grad with create_graph (the research code's); exact.
    - `jvp`: forward mode through torch.func.jvp; exact.
    - `fd`: J v by a central difference, (Phi(h + eps v) - Phi(h - eps v)) / (2 eps). Two plain block
      applications, so the penalty's gradient is an ordinary first-order backward through fused
      kernels: ~25% cheaper than `vjp` on CPU. Relative error ~1e-5 (float32) to ~1e-10 (float64).

    h is detached inside: nothing upstream of the state receives gradient. With create_graph the
    result stays differentiable w.r.t. the parameters block_fn closes over.
    """
    h = h.detach()
    if mode == "fd":
        return _central_difference_jvp(block_fn, h, v, create_graph)
    with jacobian_safe(forward_mode=mode == "jvp"):
        if mode == "jvp":
            _, u = torch.func.jvp(block_fn, (h,), (v,))
            return u if create_graph else u.detach()
        if mode == "vjp":
            h = h.requires_grad_(True)
            with torch.enable_grad():
                y = block_fn(h)
                (u,) = torch.autograd.grad(y, h, v, create_graph=create_graph)
            return u
    raise ValueError(f"mode={mode!r} is not allowed; expected one of {', '.join(JSRR_MODES)}")


def _central_difference_jvp(block_fn: BlockFn, h: torch.Tensor, v: torch.Tensor, create_graph: bool):
    """J v ~ (Phi(h + eps v) - Phi(h - eps v)) / (2 eps), eps = cbrt(machine eps) * ||h|| for unit v.

    The cube root of the machine epsilon balances truncation (O(eps^2)) against rounding
    (O(machine eps / eps)); scaling by ||h|| makes the step per element ~cbrt(machine eps) times the
    state's RMS whatever the batch size. Both applications draw the same dropout masks (the RNG is
    rewound between them), else the difference would be mask noise. Needs float32 or wider weights and
    state (16-bit rounding would swamp the difference); autocast is switched off inside.
    """
    if torch.finfo(h.dtype).bits < 32:
        raise ValueError(
            f"jsrr mode 'fd' needs a float32 or wider state and weights, got {h.dtype}: a central "
            "difference in 16 bits is rounding noise; use mode 'vjp' or 'jvp', or float32 weights "
            "with bf16 autocast"
        )
    step = torch.finfo(h.dtype).eps ** (1.0 / 3.0) * h.norm().clamp(min=1.0)
    delta = step * v.to(h.dtype)
    with torch.autocast(h.device.type, enabled=False), torch.set_grad_enabled(create_graph):
        with torch.random.fork_rng(devices=[h.device] if h.device.type == "cuda" else []):
            plus = block_fn(h + delta)  # the RNG is rewound after this: minus draws the same masks
        u = (plus - block_fn(h - delta)) / (2.0 * step)
    return u


def jsrr_penalty(
    block_fn: BlockFn,
    h: torch.Tensor,
    mode: JsrrMode = "vjp",
    power_iters: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Jacobian Spectral Radius Regularization: ||u||^2 after `power_iters` power steps from a random
    unit v (u = J v or J^T v, v <- u / ||u|| between steps). Differentiable w.r.t. the block's
    parameters only; the earlier power steps carry no graph (they only pick the direction)."""
    if power_iters < 1:
        raise ValueError(f"power_iters={power_iters} must be >= 1")
    v = random_unit_like(h, generator)
    for i in range(power_iters):
        last = i == power_iters - 1
        u = jacobian_vector_product(block_fn, h, v, mode, create_graph=last)
        if not last:
            v = _unit(u.detach())
    return u.pow(2).sum()


@torch.no_grad()
def spectral_radius(
    block_fn: BlockFn,
    h: torch.Tensor,
    iters: int = 50,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
) -> float:
    """Diagnostic: |lambda_max| of J = dPhi/dh at h by power iteration with JVPs and a Rayleigh quotient.

    Converges when the dominant eigenvalue is real and separated from the rest; stops early once the
    estimate changes by less than `tol` (relative)."""
    v = random_unit_like(h, generator)
    estimate = 0.0
    for _ in range(iters):
        u = jacobian_vector_product(block_fn, h, v, "jvp", create_graph=False)
        new = float((v * u).sum())  # Rayleigh quotient with unit v
        v = _unit(u)
        if abs(abs(new) - estimate) <= tol * max(abs(new), 1e-12):
            return abs(new)
        estimate = abs(new)
    return estimate


# ---- the STARS loss -------------------------------------------------------------------------------------
@dataclass
class StarsLoss:
    total: torch.Tensor
    ce: torch.Tensor
    jsrr: torch.Tensor | None  # None when the penalty was not computed (weight 0)
    logits: torch.Tensor


def gate_weighted_ce(model: LoopLM, run: LoopRun, labels: torch.Tensor) -> torch.Tensor:
    """Ouro's loss: per supervised token, sum_t p_t * CE_t over the run's steps t = 1..depth, where
    p_t are the exit probabilities (`LoopLM.exit_probabilities`, summing to 1), averaged over tokens.
    Position i's logits predict labels[i + 1], so position i's exit distribution weights them.
    Ouro's paper adds an entropy bonus on p; it is left out here (not part of STARS)."""
    if run.states is None:
        raise ValueError("gate_weighted_ce needs run_loop(keep_states=True)")
    probs = model.exit_probabilities(run.states)[:, :, :-1]  # [depth, B, T-1]
    target = labels[:, 1:]
    mask = target != -100
    per_step = torch.stack([
        F.cross_entropy(
            model.logits_of(replace(run, h=h))[:, :-1].float().transpose(1, 2), target, ignore_index=-100,
            reduction="none",
        )
        for h in run.states
    ])  # [depth, B, T-1], 0 where ignored
    return (probs * per_step).sum(0)[mask].sum() / mask.sum().clamp(min=1)


def stars_loss(
    model: LoopLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    depth: int,
    jsrr_weight: float,
    jsrr_mode: JsrrMode = "vjp",
    attention_mask: torch.Tensor | None = None,
    power_iters: int = 1,
    jsrr_fraction: float = 1.0,
    backprop_depth: int | None = None,
    generator: torch.Generator | None = None,
    ce_loss: CeLoss = "last_step",
) -> StarsLoss:
    """`(1 - lambda) * CE + lambda * JSRR` at `depth`. With `jsrr_weight=0` no Jacobian product runs.

    `jsrr_fraction < 1` computes the penalty on a random subset of the batch's sequences: an unbiased
    estimate of the same per-element quantity at a fraction of the cost. `ce_loss`: `last_step` is the
    CE of the logits after `depth` steps (STARS); `gate_weighted` is Ouro's objective, the CE of every
    step 1..depth weighted by the exit gate's probabilities (`gate_weighted_ce`).
    """
    if not 0.0 <= jsrr_weight <= 1.0:
        raise ValueError(f"jsrr_weight={jsrr_weight} must be in [0, 1]")
    if not 0.0 < jsrr_fraction <= 1.0:
        raise ValueError(f"jsrr_fraction={jsrr_fraction} must be in (0, 1]")
    gated = ce_loss == "gate_weighted"
    run = model.run_loop(input_ids, attention_mask, depth=depth, backprop_depth=backprop_depth, keep_states=gated)
    logits = model.logits_of(run)
    ce = gate_weighted_ce(model, run, labels) if gated else causal_lm_loss(logits, labels)
    if jsrr_weight == 0.0:
        return StarsLoss(total=ce, ce=ce, jsrr=None, logits=logits)
    rows, h = None, run.h
    batch = input_ids.shape[0]
    if jsrr_fraction < 1.0:
        n = max(1, math.ceil(jsrr_fraction * batch))
        rows = torch.randperm(batch, generator=generator)[:n].to(input_ids.device)
        h = h.index_select(0, rows)
    penalty = jsrr_penalty(model.block_fn(run, rows), h, jsrr_mode, power_iters, generator)
    total = (1.0 - jsrr_weight) * ce + jsrr_weight * penalty
    return StarsLoss(total=total, ce=ce, jsrr=penalty, logits=logits)
