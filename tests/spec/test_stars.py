"""The stars section: the loop samplers (what training draws depths from) and JSRR."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from stars.spec import FixedLoops, LognormalLoops, PoissonLognormalLoops, UniformLoops


def test_loop_samplers_by_kind(spec_of):
    for sampling, attr in [
        ({"kind": "fixed", "depth": 4}, "depth"),
        ({"kind": "poisson_lognormal", "mean": 8, "backprop_depth": 4}, "backprop_depth"),
        ({"kind": "uniform", "min": 2, "max": 8}, "max"),
    ]:
        spec = spec_of(stars={"loop_sampling": sampling})
        assert spec.stars.loop_sampling.kind == sampling["kind"]
        assert getattr(spec.stars.loop_sampling, attr) == sampling[attr]
    with pytest.raises(ValidationError, match="min \\(9\\) must be <= max \\(3\\)"):
        spec_of(stars={"loop_sampling": {"kind": "uniform", "min": 9, "max": 3}})
    with pytest.raises(ValidationError):
        spec_of(stars={"loop_sampling": {"kind": "fixed", "mu": 1.0}})  # mu is a lognormal field


def test_sampler_defaults_are_the_specs():
    p = PoissonLognormalLoops()
    assert (p.mean, p.sigma, p.min, p.max, p.backprop_depth) == (6.0, 0.5, 1, 32, None)
    ln = LognormalLoops()
    assert (ln.mu, ln.sigma, ln.min, ln.max, ln.backprop_depth) == (1.7, 0.4, 1, 16, None)
    assert FixedLoops().depth == 4 and FixedLoops().backprop_depth is None


def test_lognormal_sampler_statistics():
    sampler = LognormalLoops(mu=1.7, sigma=0.4, min=1, max=16).bind(0)
    draws = np.array([sampler(step) for step in range(100_000)])
    assert abs(draws.mean() - 5.9) <= 0.1
    assert np.median(draws) == 5
    assert draws.min() >= 1 and draws.max() <= 16


@pytest.mark.parametrize(
    "sampling",
    [LognormalLoops(), PoissonLognormalLoops(), UniformLoops(min=1, max=16), FixedLoops(depth=4)],
    ids=lambda s: s.kind,
)
def test_samplers_are_pure_functions_of_seed_and_step(sampling):
    sampler = sampling.bind(3)
    again = type(sampling).model_validate(sampling.model_dump()).bind(3)  # another DDP rank, or a resumed run
    seq = [sampler(s) for s in range(200)]
    assert seq == [again(s) for s in range(200)]
    assert seq[50:80] == [sampling.depth_at(s, 3) for s in range(50, 80)]  # any step alone, in any order
    assert all(isinstance(t, int) and t >= 1 for t in seq)
    if not isinstance(sampling, FixedLoops):
        assert len(set(seq)) > 3
        other = sampling.bind(4)
        assert seq != [other(s) for s in range(200)]


def test_sampler_depth_sequences_are_pinned():
    # the sequences training used before the samplers moved into the spec: resumed runs depend on them
    assert [LognormalLoops().depth_at(s, 0) for s in range(10)] == [6, 6, 4, 5, 6, 5, 5, 4, 5, 4]
    assert [PoissonLognormalLoops().depth_at(s, 0) for s in range(10)] == [3, 7, 4, 6, 7, 6, 7, 7, 4, 5]
    assert UniformLoops(min=2, max=5).depth_at(3, 0) == 4


def test_poisson_lognormal_mean_and_truncation():
    sampler = PoissonLognormalLoops(mean=8.0, sigma=0.5, min=1, max=200, backprop_depth=4).bind(0)
    draws = np.array([sampler(s) for s in range(20_000)])
    assert abs(draws.mean() - 9.0) < 0.2  # E[Poisson(exp(N(log m - s^2/2, s)))] + 1 = m + 1
    assert sampler.backprop_depth == 4


def test_uniform_sampler_covers_its_range():
    sampler = UniformLoops(min=2, max=5).bind(0)
    assert {sampler(s) for s in range(500)} == {2, 3, 4, 5}


@pytest.mark.parametrize("bad", [dict(min=0), dict(min=5, max=4)])
def test_sampler_bad_range(bad):
    with pytest.raises(ValueError):
        LognormalLoops(**bad)


def test_fd_jsrr_needs_float32_weights(spec_of):
    with pytest.raises(ValidationError, match="'fd' .* needs model.dtype float32, got 'bfloat16'"):
        spec_of(model={"dtype": "bfloat16"}, stars={"jsrr": {"mode": "fd"}})
    assert spec_of(model={"dtype": "bfloat16"}, stars={"jsrr": {"mode": "fd", "weight": 0}})  # JSRR off
    assert spec_of(stars={"jsrr": {"mode": "fd"}}, train={"max_steps": 100, "precision": "bf16"})  # autocast


def test_jsrr_bounds(spec_of):
    assert not spec_of(stars={"jsrr": {"weight": 0}}).stars.jsrr.enabled
    assert spec_of(stars={"jsrr": {"batch_fraction": 1.0}}).stars.jsrr.batch_fraction == 1.0
    assert spec_of(stars={"jsrr": {"mode": "fd"}}).stars.jsrr.mode == "fd"
    for bad in ({"batch_fraction": 0}, {"batch_fraction": 1.5}, {"weight": 1.0}, {"mode": "finite"}):
        with pytest.raises(ValidationError):
            spec_of(stars={"jsrr": bad})


def test_jsrr_modes_are_the_objectives():
    objective = pytest.importorskip("stars.objective")
    from typing import get_args

    from stars.spec import JSRRSpec

    assert get_args(JSRRSpec.model_fields["mode"].annotation) == objective.JSRR_MODES


def test_ce_loss_choices(problems_with):
    (problem,) = problems_with(stars={"ce_loss": "gated"})
    assert problem.path == "stars.ce_loss" and "last_step" in problem.message and "gate_weighted" in problem.message
