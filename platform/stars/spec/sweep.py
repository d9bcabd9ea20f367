"""The `sweep` section: a comparison or search as one spec, and the arithmetic of its trials.

A sweep has four dimensions, each optional (an absent one counts as one):

- `variants`: named partial specs, deep-merged onto the job's spec (settings that change together);
- `grid`: the cross product of values at dotted paths;
- `sample`: `num_samples` random draws (seeded by `sample_seed`) of values at dotted paths;
- `seeds`: repeats of every trial with these values of the top-level `seed`.

The trials are their product, in that nesting order (variant outermost, seed innermost). A variant
pins what it sets: a grid, sampled or seed value at a path the variant sets (or at a path inside or
around one) is not applied in that variant's trials and is left out of their assignments, so a
`baseline` variant with `stars.jsrr.weight: 0` stays without JSRR while the other variants sample
the weight.

The section checks what it can on its own (the model below). The rules that need the whole spec
(every path exists and may be swept, every trial validates as a job spec) are JobSpec's
(`stars.spec.job`); `sweep_points` builds the trials as spec mappings for it and for
`stars.spec.expand`, which makes them `Trial`s. Everything here takes the root model as an argument,
like `stars.spec.schema`, so this module needs no import of the job model.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from stars.spec.base import MAX_SEED, Float, Int, Section, cross_error, raise_all
from stars.spec.paths import safe_path_component
from stars.spec.schema import did_you_mean, field_members, format_path, set_path

__all__ = [
    "MAX_TRIALS",
    "SAMPLE_DIGITS",
    "EarlyStopSpec",
    "SampleDistribution",
    "SweepPoint",
    "SweepSpec",
    "VariantPatch",
    "merge_variant",
    "overlaps",
    "sweep_points",
    "trial_key",
]

#: Most trials one sweep may have (each is a training run; every one is validated up front).
MAX_TRIALS = 10_000
#: Significant digits of a sampled float: the value trained with, shown in the key and logged.
SAMPLE_DIGITS = 4

KeyPath = tuple[str, ...]
#: Longest text of one value in a trial key before it is shortened (with a hash of the whole).
_MAX_VALUE_TEXT = 40
#: How a trial key names the dimensions that are not spec paths.
_KEY_NAMES = {"variant": "v", "seed": "seed"}
_Bound = Annotated[Float, Field(ge=-1e15, le=1e15)]
_DISTRIBUTIONS = ("uniform", "loguniform", "choice")


class SampleDistribution(Section):
    """How one sampled path draws its values: exactly one of `uniform`, `loguniform`, `choice`.
    Floats are rounded to 4 significant digits."""

    uniform: tuple[_Bound, _Bound] | None = None
    """`[low, high]`: a float, uniform on [low, high] (e.g. `train.lr: {uniform: [1.0e-3, 3.0e-3]}`)."""
    loguniform: tuple[_Bound, _Bound] | None = None
    """`[low, high]` with 0 < low: a float whose logarithm is uniform, so every decade between the
    bounds is drawn equally often (e.g. `stars.jsrr.weight: {loguniform: [0.01, 0.3]}`)."""
    choice: list[Any] | None = Field(default=None, min_length=1)
    """One of these values, each equally likely (e.g. `model.norm.position: {choice: [pre, post]}`)."""

    @model_validator(mode="before")
    @classmethod
    def _one_distribution(cls, value: Any) -> Any:
        # checked before the fields, so that `{normal: [0, 1]}` gets this message, not "unknown key"
        if isinstance(value, Mapping):
            names = ", ".join(_DISTRIBUTIONS)
            for key in value:
                if key not in _DISTRIBUTIONS:
                    hint = did_you_mean(str(key), _DISTRIBUTIONS)
                    raise ValueError(f"unknown distribution {key!r}: expected one of {names}{hint}")
            given = [str(k) for k, v in value.items() if v is not None]  # a dumped spec has the others null
            if len(given) != 1:
                raise ValueError(f"expected exactly one of {names}, got {', '.join(given) or 'none'}")
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> SampleDistribution:
        given = [name for name in _DISTRIBUTIONS if getattr(self, name) is not None]
        bounds = self.uniform or self.loguniform
        if bounds is not None:
            low, high = bounds
            name = given[0]
            if low >= high:
                raise_all(
                    "SampleDistribution", [cross_error((name,), f"expected low < high, got [{low}, {high}]")]
                )
            if name == "loguniform" and low <= 0:
                raise_all(
                    "SampleDistribution", [cross_error((name,), f"expected 0 < low (a logarithm), got {low}")]
                )
        return self

    @property
    def kind(self) -> str:
        """The distribution's name: `uniform`, `loguniform` or `choice`."""
        return next(name for name in _DISTRIBUTIONS if getattr(self, name) is not None)

    def draw(self, u: float) -> Any:
        """The value at `u` in [0, 1) (the inverse of the distribution's CDF), floats rounded."""
        if self.choice is not None:
            return self.choice[min(int(u * len(self.choice)), len(self.choice) - 1)]
        if self.uniform is not None:
            low, high = self.uniform
            return _round_sample(low + u * (high - low))
        assert self.loguniform is not None
        low, high = self.loguniform
        return _round_sample(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))

    def extremes(self) -> list[Any]:
        """Values that bound every draw: the choices, or the rounded bounds (rounding is monotonic
        and every field limit is an interval, so the draws are valid wherever both bounds are)."""
        if self.choice is not None:
            return list(self.choice)
        bounds = self.uniform or self.loguniform
        assert bounds is not None
        return [_round_sample(b) for b in bounds]


def _round_sample(x: float) -> float:
    """`x` to `SAMPLE_DIGITS` significant digits."""
    return float(f"{x:.{SAMPLE_DIGITS}g}")


def _unit(seed: int, path: str, draw: int) -> float:
    """A uniform number in [0, 1) for (seed, path, draw): its own stream per path and draw, so adding
    a sampled path or raising num_samples leaves the other values as they were; the same on every
    machine and Python version (a hash, not `random`)."""
    digest = hashlib.sha256(f"{seed}/{path}/{draw}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


class EarlyStopSpec(Section):
    """Stop unpromising trials early: Ray Tune's ASHA scheduler on a metric the trials report."""

    metric: str = Field(min_length=1)
    """A metric every trial reports: `train/<name>` (e.g. `train/loss`) or an evaluation summary
    `<task>/<name>` of a task in `eval.tasks` (e.g. `addition/acc_at_16`)."""
    mode: Literal["max", "min"]
    """`max` when higher is better (accuracies), `min` when lower is (losses)."""
    grace_period: Int = Field(default=1, ge=1, le=1_000_000)
    """Reports a trial makes before it may be stopped."""
    reduction_factor: Int = Field(default=4, ge=2, le=100)
    """ASHA's eta: at each rung only the best 1/eta of the trials go on."""


class SweepSpec(Section):
    """A sweep: one trial (a Ray Tune trial and an MLflow child run) per combination of `variants` x
    `grid` x `sample` draws x `seeds`, in that nesting order; an absent dimension counts as one.
    Every trial is validated as a complete job spec before anything starts."""

    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Name -> a partial spec deep-merged onto this spec (settings that change together), e.g.
    `{baseline: {stars: {loop_sampling: {kind: fixed, depth: 4}, jsrr: {weight: 0}}}, stars: {}}`.
    Names are slugs (lowercase letters, digits, '-', '_'); `{}` is the spec as it is. A mapping whose
    `kind`, `task` or `source` differs from the spec's replaces it instead of merging into it. A
    variant pins what it sets: grid, sample and seed values for those paths do not apply to its trials."""
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    """Dotted spec path -> values, e.g. `{model.norm.type: [layernorm, rmsnorm]}`. Every path must
    exist in the spec and every value must be valid there; the trials are the cross product (in the
    grid's key order, the last key fastest)."""
    sample: dict[str, SampleDistribution] = Field(default_factory=dict)
    """Random search: dotted spec path -> distribution (`uniform`, `loguniform` or `choice`), e.g.
    `{stars.jsrr.weight: {loguniform: [0.01, 0.3]}}`. Each of the `num_samples` draws picks every
    path's value independently; the paths may not overlap the grid's."""
    num_samples: Int = Field(default=1, ge=1, le=MAX_TRIALS)
    """Draws of `sample` (more than 1 only with `sample`)."""
    sample_seed: Int = Field(default=0, ge=0, le=MAX_SEED)
    """Seed of the draws: the same spec always expands to the same values; another seed draws others."""
    seeds: list[Annotated[Int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=list)
    """Repeat every trial with each of these values of the top-level `seed` (initialisation, data
    order, loop depths), e.g. `[0, 1, 2]`."""
    max_concurrent_trials: Int | None = Field(default=None, ge=1, le=10_000)
    """Trials running at once; null = as many as the cluster's resources allow."""
    early_stop: EarlyStopSpec | None = None
    """Optional early stopping of trials (Ray Tune's ASHA scheduler); null = every trial runs to the end."""

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        errors = []
        if self.num_samples > 1 and not self.sample:
            errors.append(
                cross_error(
                    ("num_samples",),
                    f"draws of sweep.sample, which is empty: expected 1, got {self.num_samples}",
                )
            )
        seen: set[int] = set()
        for i, seed in enumerate(self.seeds):
            if seed in seen:
                errors.append(
                    cross_error(("seeds", i), f"repeats seed {seed}: its trials would be the same", seed)
                )
            seen.add(seed)
        for key in self.sample:
            for other in self.grid:
                if overlaps(tuple(key.split(".")), tuple(other.split("."))):
                    where = format_path(("sweep", "grid", other))
                    errors.append(
                        cross_error(("sample", key), f"also swept by {where}: sample it or grid it", key)
                    )
        if self.seeds:
            for dim in ("grid", "sample"):
                if "seed" in getattr(self, dim):
                    errors.append(
                        cross_error(
                            (dim, "seed"), "sweep.seeds sets the seed already: use one of them", "seed"
                        )
                    )
        if not errors and self.num_trials > MAX_TRIALS:
            errors.append(
                cross_error((), f"{self.num_trials} trials, more than the {MAX_TRIALS} a sweep may have")
            )
        raise_all("SweepSpec", errors)
        return self

    @property
    def enabled(self) -> bool:
        """Whether any dimension is given: the job is then a sweep of `num_trials` trials, each an
        MLflow child run (even a sweep of one trial); otherwise it is one plain trial."""
        return bool(self.variants or self.grid or self.sample or self.seeds)

    @property
    def num_trials(self) -> int:
        """Trials of the sweep: the product of the dimensions' sizes (1 without a sweep)."""
        n = max(1, len(self.variants)) * max(1, len(self.seeds))
        for values in self.grid.values():
            n *= len(values)
        return n * (self.num_samples if self.sample else 1)

    def draws(self) -> list[dict[str, Any]]:
        """The `num_samples` draws of `sample`, each path -> value ([{}] without `sample`)."""
        if not self.sample:
            return [{}]
        return [
            {path: dist.draw(_unit(self.sample_seed, path, i)) for path, dist in self.sample.items()}
            for i in range(self.num_samples)
        ]


# ---------------------------------------------------------------------------------- variants
def overlaps(a: KeyPath, b: KeyPath) -> bool:
    """Whether setting path `a` and setting path `b` touch the same value (one is a prefix of the other)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _discriminator(root: type[BaseModel], path: KeyPath) -> str | None:
    """The discriminator key of the union field at `path` (`kind`, `task`, `source`), else None."""
    models = [root]
    field = None
    for key in path:
        field = next((m.model_fields[key] for m in models if key in m.model_fields), None)
        if field is None:
            return None
        models = field_members(field.annotation)
    disc = getattr(field, "discriminator", None)
    return disc if isinstance(disc, str) else None


@dataclass(frozen=True)
class VariantPatch:
    """A variant merged onto the job's spec."""

    name: str
    data: dict[str, Any]
    """The spec mapping with the variant merged in (no sweep)."""
    touched: frozenset[KeyPath]
    """Every key path the variant names, mappings included (`stars`, `stars.jsrr`, `stars.jsrr.weight`)."""
    pinned: frozenset[KeyPath]
    """The paths whose values the variant sets: its leaves, and mappings it replaces wholesale."""

    def pins(self, path: KeyPath) -> bool:
        """Whether the variant sets `path`, something inside it, or something around it."""
        return self.pinned_at(path) is not None

    def pinned_at(self, path: KeyPath) -> KeyPath | None:
        """The path the variant sets that overlaps `path` (the first, in sorted order), else None."""
        return next((p for p in sorted(self.pinned) if overlaps(path, p)), None)


def merge_variant(
    base: Mapping[str, Any], name: str, variant: Mapping[str, Any], root: type[BaseModel]
) -> VariantPatch:
    """`variant` deep-merged onto `base` (a spec mapping): mappings merge key by key, except that a
    mapping whose discriminator (`root`'s union tag at that path) differs from the base's replaces it,
    so `loop_sampling: {kind: fixed, depth: 4}` keeps nothing of a lognormal sampler."""
    data = copy.deepcopy(dict(base))
    touched: set[KeyPath] = set()
    pinned: set[KeyPath] = set()

    def merge(target: dict[str, Any], patch: Mapping[str, Any], path: KeyPath) -> None:
        for key, value in patch.items():
            here = (*path, str(key))
            touched.add(here)
            current = target.get(key)
            if isinstance(value, Mapping) and isinstance(current, dict):
                disc = _discriminator(root, here)
                if disc is None or disc not in value or value[disc] == current.get(disc):
                    merge(current, value, here)
                    continue
            target[key] = copy.deepcopy(value)
            pinned.add(here)
            if isinstance(value, Mapping):  # a replaced member: name its keys too, for error paths
                touched.update((*here, *p) for p in _key_paths(value))

    merge(data, variant, ())
    return VariantPatch(name, data, frozenset(touched), frozenset(pinned))


def _key_paths(mapping: Mapping[str, Any]) -> Iterator[KeyPath]:
    for key, value in mapping.items():
        yield (str(key),)
        if isinstance(value, Mapping):
            yield from ((str(key), *p) for p in _key_paths(value))


# ------------------------------------------------------------------------------------ points
def trial_key(index: int, assignments: Mapping[str, Any]) -> str:
    """A trial's deterministic, readable id, also its directory name: `t003-v=stars,type=rmsnorm,seed=1`
    (`t000` without a sweep). Paths are named by their last part (the whole path where two share
    it), the variant as `v`, the seed as `seed`. Always one safe path component
    (`safe_path_component`): a value such as `../../x` cannot move the trial's directory out of the
    job's; the index keeps keys unique."""
    if not assignments:
        return f"t{index:03d}"
    short = [_KEY_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in assignments]
    names = [k if short.count(s) > 1 else s for k, s in zip(assignments, short, strict=True)]
    parts = [f"{n}={_short(v)}" for n, v in zip(names, assignments.values(), strict=True)]
    return safe_path_component(f"t{index:03d}-" + ",".join(parts))


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    else:
        text = str(value)
    if len(text) <= _MAX_VALUE_TEXT:
        return text
    return text[: _MAX_VALUE_TEXT - 8] + "-" + hashlib.sha256(text.encode()).hexdigest()[:7]


@dataclass(frozen=True)
class SweepPoint:
    """One trial of a sweep as data: where its values come from and the spec mapping they make."""

    index: int
    """0-based position in the product variants x grid x draws x seeds."""
    variant: VariantPatch | None
    """The trial's variant (None without `variants`)."""
    draw: int | None
    """The trial's draw of `sample` (None without `sample`)."""
    assignments: dict[str, Any]
    """What distinguishes the trial: `variant` (its name), grid and sampled paths -> values, `seed`;
    paths the variant pins are left out."""
    data: dict[str, Any]
    """The spec mapping with the point applied and no `sweep` section."""

    @property
    def key(self) -> str:
        """The trial's key (`trial_key`)."""
        return trial_key(self.index, self.assignments)


def sweep_points(sweep: SweepSpec, base: Mapping[str, Any], root: type[BaseModel]) -> Iterator[SweepPoint]:
    """The trials of `sweep` over `base` (a spec mapping without `sweep`), in order; nothing when the
    sweep has no dimension. Lazy: a trial's mapping is built when it is reached."""
    if not sweep.enabled:
        return
    if sweep.variants:
        patches: list[VariantPatch | None] = [
            merge_variant(base, name, v, root) for name, v in sweep.variants.items()
        ]
    else:
        patches = [None]
    grid_keys = list(sweep.grid)
    combos = list(itertools.product(*(sweep.grid[k] for k in grid_keys)))
    draws = sweep.draws()
    seeds: list[int | None] = list(sweep.seeds) or [None]
    index = 0
    for patch in patches:
        for combo in combos:
            for d, drawn in enumerate(draws):
                for seed in seeds:
                    values: dict[str, Any] = dict(zip(grid_keys, combo, strict=True)) | drawn
                    if seed is not None:
                        values["seed"] = seed
                    if patch is not None:
                        values = {k: v for k, v in values.items() if not patch.pins(tuple(k.split(".")))}
                    data = copy.deepcopy(patch.data if patch is not None else dict(base))
                    for key, value in values.items():
                        set_path(data, key.split("."), copy.deepcopy(value))
                    assignments = ({"variant": patch.name} if patch is not None else {}) | values
                    yield SweepPoint(index, patch, d if sweep.sample else None, assignments, data)
                    index += 1
