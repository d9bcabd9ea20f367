"""The sweep section's dimensions (variants, grid, sample, seeds), their product and order, the values
each trial gets, and the problems validation reports before anything starts."""

from __future__ import annotations

import itertools
import math
import re

import pytest
from pydantic import ValidationError

from stars.spec import MAX_TRIALS, SweepSpec, format_path, load_spec, spec_hash, sweep_trials

COMPARISON = """\
name: cmp
data: {task: addition}
train: {max_steps: 100}
sweep:
  variants:
    baseline: {model: {norm: {position: pre}}, stars: {loop_sampling: {kind: fixed, depth: 4}, jsrr: {weight: 0}}}
    random_loop: {stars: {jsrr: {weight: 0}}}
    jsrr: {stars: {loop_sampling: {kind: fixed, depth: 4}}}
    stars: {}
  grid: {model.norm.type: [layernorm, rmsnorm]}
  sample:
    stars.jsrr.weight: {loguniform: [0.01, 0.3]}
    model.norm.position: {choice: [pre, post_sandwich]}
    train.lr: {uniform: [1.0e-3, 3.0e-3]}
  num_samples: 4
  sample_seed: 0
  seeds: [0, 1, 2]
  max_concurrent_trials: 2
  early_stop: {metric: addition/acc_at_16, mode: max, grace_period: 2, reduction_factor: 2}
"""


def _by_path(problems) -> dict:
    return {p.path: p for p in problems}


# ---- the product and its order ----------------------------------------------------------------------
def test_the_comparison_expands_to_the_product_in_nesting_order(write):
    spec = load_spec(write(COMPARISON))
    trials = sweep_trials(spec)
    assert len(trials) == spec.sweep.num_trials == 4 * 2 * 4 * 3
    assert [t.index for t in trials] == list(range(96))
    # variant outermost, then grid, then the draw, seed innermost
    variants = [t.assignments["variant"] for t in trials]
    assert variants == [v for v in ("baseline", "random_loop", "jsrr", "stars") for _ in range(24)]
    assert [t.assignments["model.norm.type"] for t in trials[:24]] == ["layernorm"] * 12 + ["rmsnorm"] * 12
    assert [t.spec.seed for t in trials[:6]] == [0, 1, 2, 0, 1, 2]
    lrs = [t.assignments["train.lr"] for t in trials[:12]]
    assert lrs[0] == lrs[1] == lrs[2] != lrs[3]  # one draw per 3 seeds
    assert spec.sweep.max_concurrent_trials == 2
    stop = spec.sweep.early_stop
    assert stop is not None
    assert (stop.metric, stop.mode, stop.grace_period, stop.reduction_factor) == (
        "addition/acc_at_16",
        "max",
        2,
        2,
    )


def test_each_dimension_alone_and_their_product(spec_of):
    def assignments(**sweep):
        return [t.assignments for t in sweep_trials(spec_of(sweep=sweep))]

    assert assignments(variants={"a": {}, "b": {"train": {"lr": 0.002}}}) == [
        {"variant": "a"},
        {"variant": "b"},
    ]
    assert assignments(seeds=[3, 1]) == [{"seed": 3}, {"seed": 1}]
    assert assignments(grid={"train.lr": [0.1, 0.2]}) == [{"train.lr": 0.1}, {"train.lr": 0.2}]
    drawn = assignments(sample={"train.lr": {"uniform": [0.001, 0.002]}}, num_samples=3)
    assert [list(a) for a in drawn] == [["train.lr"]] * 3 and len({a["train.lr"] for a in drawn}) == 3
    full = assignments(
        variants={"a": {}, "b": {"model": {"dropout": 0.1}}},
        grid={"model.norm.type": ["layernorm", "rmsnorm"], "train.warmup_steps": [0, 10]},
        sample={"train.lr": {"uniform": [0.001, 0.002]}},
        num_samples=2,
        seeds=[0, 1],
    )
    assert len(full) == 2 * 4 * 2 * 2
    lrs = sorted({a["train.lr"] for a in full})
    expected = [
        {"variant": v, "model.norm.type": n, "train.warmup_steps": w, "train.lr": lr, "seed": s}
        for v, n, w, s_lr, s in itertools.product("ab", ["layernorm", "rmsnorm"], [0, 10], [0, 1], [0, 1])
        for lr in [[a["train.lr"] for a in full[:4:2]][s_lr]]
    ]
    assert full == expected and len(lrs) == 2
    assert list(full[0]) == ["variant", "model.norm.type", "train.warmup_steps", "train.lr", "seed"]


def test_a_spec_without_sweep_dimensions_is_one_plain_trial(spec_of):
    for sweep in ({}, {"max_concurrent_trials": 3}):
        spec = spec_of(sweep=sweep)
        (trial,) = sweep_trials(spec)
        assert (trial.index, trial.key, trial.assignments) == (0, "t000", {})
        assert trial.spec is spec
        assert not spec.sweep.enabled and spec.sweep.num_trials == 1
    (one,) = sweep_trials(spec_of(sweep={"seeds": [5]}))  # one trial, still a sweep
    assert (one.key, one.assignments, one.spec.seed) == ("t000-seed=5", {"seed": 5}, 5)


def test_every_trial_spec_has_its_point_applied_and_an_empty_sweep(write):
    spec = load_spec(write(COMPARISON))
    trials = sweep_trials(spec)
    assert all(t.spec.sweep == SweepSpec() for t in trials)
    for t in trials:
        for path, value in t.assignments.items():
            node = t.spec.model_dump()
            for part in ("name" if path == "variant" else path).split("."):
                node = node[part]
            assert path == "variant" or node == value, (t.key, path)
    assert len({spec_hash(t.spec) for t in trials}) == len(trials)
    # the sweep section never enters the hash: the plain variant's trial hashes as the spec without a sweep
    plain = load_spec(write(COMPARISON.split("sweep:")[0] + "sweep: {variants: {stars: {}}}\n", "plain.yaml"))
    (trial,) = sweep_trials(plain)
    assert (
        spec_hash(trial.spec)
        == spec_hash(plain)
        == spec_hash(plain.model_copy(update={"sweep": SweepSpec()}))
    )


# ---- variants ---------------------------------------------------------------------------------------
def test_a_variant_merges_mappings_and_replaces_union_members(spec_of):
    spec = spec_of(
        model={"d_model": 64, "norm": {"type": "rmsnorm"}},
        stars={"loop_sampling": {"kind": "lognormal", "mu": 2.0}},
        sweep={
            "variants": {
                "fixed": {
                    "model": {"norm": {"position": "pre"}},
                    "stars": {"loop_sampling": {"kind": "fixed", "depth": 4}},
                },
                "narrow": {"stars": {"loop_sampling": {"kind": "lognormal", "sigma": 0.2}}},
                "ckpt": {"model": {"source": "pretrained", "pretrained": "some/dir"}},
                "base": {},
            }
        },
    )
    fixed, narrow, ckpt, base = (t.spec for t in sweep_trials(spec))
    assert (
        fixed.model.norm.position == "pre"
        and fixed.model.norm.type == "rmsnorm"
        and fixed.model.d_model == 64
    )
    assert fixed.stars.loop_sampling.model_dump() == {"kind": "fixed", "depth": 4}  # no mu of the lognormal
    assert (narrow.stars.loop_sampling.mu, narrow.stars.loop_sampling.sigma) == (
        2.0,
        0.2,
    )  # same kind: merged
    assert ckpt.model.source == "pretrained" and not hasattr(ckpt.model, "d_model")
    assert base.model_dump(exclude={"sweep"}) == spec.model_dump(exclude={"sweep"})


def test_a_variant_pins_what_it_sets(write):
    trials = sweep_trials(load_spec(write(COMPARISON)))
    baseline = [t for t in trials if t.assignments["variant"] == "baseline"]
    assert all(t.spec.stars.jsrr.weight == 0 and t.spec.model.norm.position == "pre" for t in baseline)
    assert all(
        "stars.jsrr.weight" not in t.assignments and "model.norm.position" not in t.assignments
        for t in baseline
    )
    jsrr = [t for t in trials if t.assignments["variant"] == "jsrr"]
    assert all(t.spec.stars.jsrr.weight == t.assignments["stars.jsrr.weight"] > 0 for t in jsrr)
    assert len({t.spec.stars.jsrr.weight for t in jsrr}) == 4  # one per draw


def test_variant_names_paths_and_values_are_checked(write, problems_of):
    text = """\
name: t
model: {dtype: bfloat16}
data: {task: addition}
train: {max_steps: 10}
sweep:
  variants:
    fd: {stars: {jsrr: {mode: fd}}}
    Big Name: {}
    typo: {model: {norm: {typ: rmsnorm}}}
    place: {resources: {storage_path: /x}}
    log: {tracking: {uri: y}}
    ckpt: {model: {source: pretrained}}
    heads: {model: {d_model: 66}}
"""
    by_path = _by_path(problems_of(write(text)))
    fd = by_path["sweep.variants.fd.stars.jsrr.mode"]
    assert fd.line == 7 and "needs model.dtype float32, got 'bfloat16'" in fd.message
    assert "expected a slug" in by_path["sweep.variants.Big Name"].message
    assert by_path["sweep.variants.typo.model.norm.typ"].line == 9
    assert "did you mean 'type'?" in by_path["sweep.variants.typo.model.norm.typ"].message
    assert "cannot be varied" in by_path["sweep.variants.place.resources.storage_path"].message
    assert "cannot be varied" in by_path["sweep.variants.log.tracking"].message
    assert "required field is missing" in by_path["sweep.variants.ckpt.model.pretrained"].message
    assert "makes model.n_heads invalid" in by_path["sweep.variants.heads"].message


def test_a_variant_may_not_pin_a_path_the_grid_or_seeds_vary(spec_of):
    with pytest.raises(ValidationError, match=r"sets train.lr, which sweep.grid\['train.lr'\] varies"):
        spec_of(sweep={"variants": {"a": {"train": {"lr": 0.1}}, "b": {}}, "grid": {"train.lr": [0.1, 0.2]}})
    with pytest.raises(ValidationError, match="sets seed, which sweep.seeds varies"):
        spec_of(sweep={"variants": {"a": {"seed": 3}}, "seeds": [0, 1]})
    with pytest.raises(ValidationError, match="sets every sampled path"):
        spec_of(
            sweep={
                "variants": {"a": {"train": {"lr": 0.1}}},
                "sample": {"train.lr": {"uniform": [0.1, 0.2]}},
                "num_samples": 2,
            }
        )


def test_trials_that_would_train_the_same_spec_are_refused(spec_of):
    # 0.1 is the default weight: the two variants are the same job
    with pytest.raises(
        ValidationError, match="trials t000-v=plain and t001-v=same would train the same spec"
    ):
        spec_of(sweep={"variants": {"plain": {}, "same": {"stars": {"jsrr": {"weight": 0.1}}}}})
    with pytest.raises(ValidationError, match="would train the same spec"):
        spec_of(sweep={"grid": {"train.lr": [0.001, 1.0e-3]}})


# ---- every trial validated, the problem placed where it was set ---------------------------------------
def test_an_invalid_combination_is_reported_at_the_part_that_set_it(write, problems_of):
    text = """\
name: t
data: {task: addition}
train: {max_steps: 10}
sweep:
  variants:
    fd: {stars: {jsrr: {mode: fd}}}
    vjp: {}
  grid: {model.dtype: [float32, bfloat16]}
"""
    (problem,) = problems_of(write(text))
    assert problem.path == "sweep.variants.fd.stars.jsrr.mode" and problem.line == 6
    assert problem.message.startswith(
        "trial t001-v=fd,dtype=bfloat16: 'fd' (a central difference) needs model.dtype"
    )
    sampled = text.replace("  variants:\n    fd: {stars: {jsrr: {mode: fd}}}\n    vjp: {}\n", "") + (
        "  sample: {stars.jsrr.mode: {choice: [vjp, fd]}}\n  num_samples: 8\n"
    )
    problems = [p for p in problems_of(write(sampled, "sampled.yaml")) if p.path != "sweep"]  # not the count
    assert problems and {p.path for p in problems} == {"sweep.sample['stars.jsrr.mode']"}
    assert all(
        p.line == 6 and "dtype=bfloat16" in p.message and "needs model.dtype float32" in p.message
        for p in problems
    )


def test_a_combination_invalid_elsewhere_names_the_trial(spec_of):
    with pytest.raises(ValidationError) as info:
        spec_of(sweep={"grid": {"model.d_model": [64, 96], "model.n_heads": [4, 64]}})  # 96 % 64 != 0
    (error,) = info.value.errors()
    assert error["loc"] == ("sweep", "grid", "model.n_heads")
    assert error["msg"].startswith("trial t003-d_model=96,n_heads=64: model.n_heads: must divide d_model=96")


def test_invalid_trials_beyond_five_are_counted(spec_of):
    with pytest.raises(ValidationError) as info:
        spec_of(
            sweep={
                "variants": {"fd": {"stars": {"jsrr": {"mode": "fd"}}}},
                "grid": {"model.dtype": ["bfloat16", "float16"]},
                "seeds": [0, 1, 2, 3],
            }
        )
    messages = [e["msg"] for e in info.value.errors()]
    assert "8 of 8 trials are invalid; the first 5 are shown" in messages and len(messages) == 6


def test_derived_defaults_follow_each_trial(spec_of):
    trials = sweep_trials(spec_of(sweep={"grid": {"resources.num_workers": [1, 2, 4]}}))
    assert [t.spec.train.micro_batch_size for t in trials] == [128, 64, 32]
    pinned = sweep_trials(
        spec_of(
            train={"max_steps": 100, "micro_batch_size": 16},
            sweep={"grid": {"resources.num_workers": [1, 2]}},
        )
    )
    assert [t.spec.train.micro_batch_size for t in pinned] == [16, 16]  # set by the user: kept


# ---- sampling -----------------------------------------------------------------------------------------
def _draws(spec_of, seed=0, n=4, **dists):
    spec = spec_of(sweep={"sample": dists, "num_samples": n, "sample_seed": seed})
    return [t.assignments for t in sweep_trials(spec)]


def test_samples_are_deterministic_and_seeded(spec_of):
    dists = {"stars.jsrr.weight": {"loguniform": [0.01, 0.3]}, "train.lr": {"uniform": [1.0e-3, 3.0e-3]}}
    first = _draws(spec_of, **dists)
    assert first == _draws(spec_of, **dists)
    assert first != _draws(spec_of, seed=1, **dists)
    assert _draws(spec_of, n=6, **dists)[:4] == first  # more draws keep the earlier ones
    alone = _draws(spec_of, **{"train.lr": dists["train.lr"]})
    assert [a["train.lr"] for a in alone] == [a["train.lr"] for a in first]  # each path draws on its own


def test_sampled_floats_have_four_significant_digits_in_key_params_and_spec(spec_of):
    spec = spec_of(sweep={"sample": {"stars.jsrr.weight": {"loguniform": [0.01, 0.3]}}, "num_samples": 20})
    for trial in sweep_trials(spec):
        w = trial.assignments["stars.jsrr.weight"]
        assert w == float(f"{w:.4g}") == trial.spec.stars.jsrr.weight
        assert trial.key.endswith(f"-weight={w}")


def test_loguniform_stays_in_bounds_and_spreads_over_decades(spec_of):
    values = [a["train.lr"] for a in _draws(spec_of, n=600, **{"train.lr": {"loguniform": [1.0e-4, 0.1]}})]
    assert all(1.0e-4 <= v <= 0.1 for v in values)
    per_decade = [sum(10**k <= v < 10 ** (k + 1) for v in values) for k in (-4, -3, -2)]
    assert all(150 <= n <= 250 for n in per_decade), (
        per_decade
    )  # ~200 each; uniform would put ~90% in the last
    assert abs(statistics_median(values) - math.sqrt(1.0e-4 * 0.1)) < 0.002


def statistics_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def test_choice_draws_every_value(spec_of):
    values = {
        a["model.norm.position"]
        for a in _draws(spec_of, n=40, **{"model.norm.position": {"choice": ["pre", "post", "pre_sandwich"]}})
    }
    assert values == {"pre", "post", "pre_sandwich"}


@pytest.mark.parametrize(
    ("dist", "path", "fragment"),
    [
        (
            {"normal": [0, 1]},
            "sweep.sample['stars.jsrr.weight']",
            "unknown distribution 'normal': expected one of uniform, loguniform, choice",
        ),
        (
            {"uniform": [0.1, 0.2], "choice": [0.1]},
            "sweep.sample['stars.jsrr.weight']",
            "expected exactly one of",
        ),
        ({}, "sweep.sample['stars.jsrr.weight']", "got none"),
        ({"uniform": [0.2, 0.1]}, "sweep.sample['stars.jsrr.weight'].uniform", "expected low < high"),
        ({"loguniform": [0, 0.1]}, "sweep.sample['stars.jsrr.weight'].loguniform", "expected 0 < low"),
        (
            {"uniform": [0.5, 1.0]},
            "sweep.sample['stars.jsrr.weight'].uniform[1]",
            "expected a number < 1, got 1.0",
        ),
        ({"choice": []}, "sweep.sample['stars.jsrr.weight'].choice", "at least 1 item"),
        ({"choice": [0.1, "x"]}, "sweep.sample['stars.jsrr.weight'].choice[1]", "expected a number, got 'x'"),
    ],
)
def test_bad_distributions_are_clear_errors(problems_with, dist, path, fragment):
    problems = problems_with(sweep={"sample": {"stars.jsrr.weight": dist}})
    assert any(p.path == path and fragment in p.message for p in problems), problems


def test_uniform_on_an_integer_field_says_to_use_choice(problems_with):
    (problem,) = problems_with(sweep={"sample": {"model.n_block": {"uniform": [1, 4]}}})[:1]
    assert problem.path == "sweep.sample['model.n_block'].uniform[0]"
    assert "expected an integer, got 1.0" in problem.message and "`choice`" in problem.message


# ---- paths, seeds, counts, early stopping ------------------------------------------------------------------
@pytest.mark.parametrize(
    "path", ["name", "experiment", "tracking.uri", "resources.storage_path", "sweep.seeds"]
)
def test_unsweepable_paths_are_refused_in_grid_and_sample(problems_with, path):
    problems = problems_with(sweep={"sample": {path: {"choice": ["x"]}}, "grid": {}})
    where = format_path(("sweep", "sample", path))
    assert any(p.path == where and "cannot be swept" in p.message for p in problems), problems
    problems = problems_with(sweep={"grid": {path: ["x"]}})
    assert any("cannot be swept" in p.message for p in problems), problems


def test_an_unknown_sample_path_is_named(problems_with):
    (problem,) = problems_with(sweep={"sample": {"train.lrr": {"uniform": [0.1, 0.2]}}})
    assert problem.path == "sweep.sample['train.lrr']" and "did you mean 'lr'?" in problem.message


def test_seeds_set_the_top_level_seed(spec_of):
    trials = sweep_trials(spec_of(seed=7, sweep={"grid": {"train.lr": [0.1, 0.2]}, "seeds": [0, 1, 2]}))
    assert [(t.spec.seed, t.assignments["seed"]) for t in trials] == [
        (s, s) for _ in range(2) for s in (0, 1, 2)
    ]
    assert [t.key for t in trials[:2]] == ["t000-lr=0.1,seed=0", "t001-lr=0.1,seed=1"]
    assert all(t.spec.data.seed == 0 for t in trials)  # the data's own seed is another field


@pytest.mark.parametrize(
    ("sweep", "path", "fragment"),
    [
        ({"seeds": [0, 1, 0]}, "sweep.seeds[2]", "repeats seed 0"),
        ({"seeds": [0, 1], "grid": {"seed": [2, 3]}}, "sweep.grid.seed", "sweep.seeds sets the seed already"),
        ({"num_samples": 3}, "sweep.num_samples", "expected 1, got 3"),
        (
            {"sample": {"train": {"choice": [{"lr": 0.1}]}}, "grid": {"train.lr": [0.1]}},
            "sweep.sample.train",
            "also swept by sweep.grid['train.lr']",
        ),
        ({"seeds": [-1]}, "sweep.seeds[0]", ">= 0"),
        ({"variants": {"a": 3}}, "sweep.variants.a", "expected a mapping"),
    ],
)
def test_sweep_section_rules(problems_with, sweep, path, fragment):
    problems = problems_with(sweep=sweep)
    assert any(p.path == path and fragment in p.message for p in problems), problems


def test_a_sweep_has_at_most_max_trials(spec_of):
    with pytest.raises(ValidationError, match=f"more than the {MAX_TRIALS} a sweep may have"):
        spec_of(
            sweep={
                "sample": {"train.lr": {"uniform": [0.1, 0.2]}},
                "num_samples": MAX_TRIALS,
                "seeds": [0, 1],
            }
        )


def test_early_stop_needs_a_sweep_a_reported_metric_and_a_mode(problems_with, spec_of):
    stop = {"metric": "addition/acc_at_16", "mode": "max"}
    (problem,) = problems_with(sweep={"early_stop": stop})
    assert problem.path == "sweep.early_stop" and "needs a sweep" in problem.message
    (problem,) = problems_with(sweep={"seeds": [0, 1], "early_stop": {**stop, "metric": "math500/acc"}})
    assert (
        problem.path == "sweep.early_stop.metric" and "for a task in eval.tasks (addition)" in problem.message
    )
    (problem,) = problems_with(sweep={"seeds": [0, 1], "early_stop": {"metric": "train/loss"}})
    assert problem.path == "sweep.early_stop.mode" and "required" in problem.message
    (problem,) = problems_with(sweep={"seeds": [0, 1], "early_stop": {**stop, "reduction_factor": 1}})
    assert problem.path == "sweep.early_stop.reduction_factor" and ">= 2" in problem.message
    spec = spec_of(sweep={"seeds": [0, 1], "early_stop": {"metric": "train/loss", "mode": "min"}})
    assert spec.sweep.early_stop is not None
    assert (spec.sweep.early_stop.grace_period, spec.sweep.early_stop.reduction_factor) == (1, 4)


# ---- keys ------------------------------------------------------------------------------------------------
def test_keys_are_unique_safe_and_stable(write):
    trials = sweep_trials(load_spec(write(COMPARISON)))
    keys = [t.key for t in trials]
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"t\d{3}-[A-Za-z0-9._=,+-]+", k) and len(k) <= 120 for k in keys)
    assert keys == [t.key for t in sweep_trials(load_spec(write(COMPARISON, "again.yaml")))]
    # the draws are a hash of (sample_seed, path, draw): the same on every machine and Python version
    assert keys[0] == "t000-v=baseline,type=layernorm,lr=0.001783,seed=0"
    assert keys[-1] == "t095-v=stars,type=rmsnorm,weight=0.02672,position=post_sandwich,lr=0.002926,seed=2"


def test_the_num_trials_counts_the_product(spec_of):
    sweep = SweepSpec(
        variants={"a": {}, "b": {}, "c": {}},
        grid={"train.lr": [0.1, 0.2]},
        sample={"train.warmup_steps": {"choice": [0, 10]}},
        num_samples=5,
        seeds=[0, 1],
    )
    assert sweep.num_trials == 3 * 2 * 5 * 2 and sweep.enabled
    assert SweepSpec(num_samples=1, max_concurrent_trials=4).num_trials == 1
