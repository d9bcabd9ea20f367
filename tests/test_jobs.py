"""Every job spec in jobs/ validates, and the named jobs say what they promise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stars.spec import JobSpec, load_spec, spec_warnings, sweep_trials

JOBS = Path(__file__).resolve().parents[1] / "jobs"
JOB_FILES = sorted(JOBS.glob("*.yaml")) + sorted(JOBS.glob("*.yml"))


def load(name: str) -> JobSpec:
    return load_spec(JOBS / name)


def test_the_named_jobs_exist():
    names = {p.name for p in JOB_FILES}
    assert {"addition.yaml", "addition-fixed-depth.yaml", "norm-study.yaml", "stars_numina.yaml",
            "sft_numina.yaml"} <= names
    assert "ouro-numina.yaml" not in names  # renamed to stars_numina.yaml


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_job_validates(path):
    spec = load_spec(path)
    assert spec.name == path.stem, "the job name should match its file name"
    assert spec_warnings(spec) == []


def test_addition_is_the_baseline_vs_stars_quickstart():
    spec = load("addition.yaml")
    baseline, stars = (t.spec for t in sweep_trials(spec))
    assert [t.key for t in sweep_trials(spec)] == ["t000-v=baseline", "t001-v=stars"]
    assert spec.sweep.max_concurrent_trials == 2  # side by side on the 2-core machine
    m = stars.model
    assert (m.source, m.d_model, m.n_heads, m.n_block) == ("looplm", 64, 4, 2)
    assert (m.norm.type, m.norm.position, m.injection, m.positions) == ("layernorm", "post_sandwich", "add", "learned")
    assert m.embed_init_std == 1.0  # std 0.02 drowned the injected input (measured: no learning)
    assert not m.tie_word_embeddings  # tied to N(0, 1) embeddings: CE ~42 at step 1, no jump by step 3000
    ls = stars.stars.loop_sampling
    assert (ls.kind, ls.mu, ls.sigma, ls.min, ls.max) == ("lognormal", 1.7, 0.4, 1, 16)
    assert (stars.stars.jsrr.weight, stars.stars.jsrr.mode) == (0.1, "fd")
    t = stars.train
    assert (t.global_batch_size, t.lr, t.schedule, t.warmup_steps) == (128, 3e-3, "cosine", 100)
    assert 2000 <= t.max_steps <= 3000  # measured jump at ~1400 steps
    # the baseline arm is jobs/addition-fixed-depth.yaml's model and recipe
    fixed = load("addition-fixed-depth.yaml")
    assert baseline.model == fixed.model and baseline.stars.loop_sampling == fixed.stars.loop_sampling
    assert not baseline.stars.jsrr.enabled
    assert (baseline.train.max_steps, baseline.train.lr) == (fixed.train.max_steps, fixed.train.lr)
    for trial in (baseline, stars):
        assert trial.resources.num_workers == 1 and not trial.resources.use_gpu
        assert trial.eval.tasks == ["addition"] and trial.eval.depths == list(range(1, 17))


def test_fixed_depth_baseline():
    spec = load("addition-fixed-depth.yaml")
    assert spec.model.norm.position == "pre"
    assert spec.stars.loop_sampling.kind == "fixed" and spec.stars.loop_sampling.depth == 4
    assert not spec.stars.jsrr.enabled


def test_norm_study_covers_all_twelve_structures_at_depth_four():
    trials = sweep_trials(load("norm-study.yaml"))
    combos = {(t.spec.model.norm.position, t.spec.model.norm.type) for t in trials}
    assert len(trials) == 12 and len(combos) == 12
    assert {p for p, _ in combos} == {"pre", "post", "pre_sandwich", "post_sandwich"}
    assert {n for _, n in combos} == {"layernorm", "rmsnorm", "simplenorm"}
    assert all(t.spec.stars.loop_sampling.kind == "fixed" and t.spec.stars.loop_sampling.depth == 4 for t in trials)


def test_stars_numina_is_the_paper_recipe():
    spec = load("stars_numina.yaml")
    assert spec.model.source == "ouro" and spec.model.pretrained == "ByteDance/Ouro-1.4B"
    assert spec.model.dtype == "float32" and not spec.model.trust_remote_code  # fp32 master weights
    r = spec.resources
    assert (r.use_gpu, r.accelerator_type, r.num_workers) == (True, "A800", 4)
    t = spec.train
    assert (t.precision, t.schedule, t.lr, t.global_batch_size, t.epochs) == ("bf16", "cosine", 1e-6, 256, 1)
    assert t.gradient_checkpointing and tuple(t.betas) == (0.9, 0.95) and t.weight_decay == 0.0
    assert spec.grad_accum_steps == 32
    d = spec.data
    assert (d.task, d.dataset, d.num_samples, d.shuffle_seed, d.max_seq_len) == (
        "math_sft", "AI-MO/NuminaMath-1.5", 400_000, 74, 2048,
    )
    s = spec.stars
    assert (s.loop_sampling.kind, s.loop_sampling.mu, s.loop_sampling.sigma) == ("lognormal", 1.7, 0.4)
    assert (s.loop_sampling.min, s.loop_sampling.max, s.jsrr.weight, s.ce_loss) == (1, 16, 0.1, "last_step")
    assert set(spec.eval.tasks) == {"gsm8k", "math500", "asdiv", "svamp", "amc23"}
    # the research code's schedule is one --set away
    wsd = load_spec(JOBS / "stars_numina.yaml", ["train.schedule=wsd"]).train
    assert (wsd.schedule, wsd.warmup_fraction, wsd.decay_fraction, wsd.min_lr_ratio) == ("wsd", 0.1, 0.1, 0.001)


def test_sft_numina_differs_from_stars_numina_only_in_the_stars_recipe():
    stars, sft = load("stars_numina.yaml"), load("sft_numina.yaml")
    assert sft.stars.loop_sampling.kind == "fixed" and sft.stars.loop_sampling.depth == 4
    assert sft.stars.jsrr.weight == 0.0
    same = ("model", "data", "train", "resources", "eval", "tracking", "experiment", "seed")
    for section in same:
        assert getattr(sft, section) == getattr(stars, section), section
    assert stars.eval.depths == list(range(1, 17))


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_jobs_match_the_published_json_schema(path):
    """What `starsctl schema` prints is usable by editors: the shipped jobs validate against it."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(path.read_text()), JobSpec.model_json_schema())


def test_the_ablation_is_four_variants_times_three_seeds():
    trials = sweep_trials(load("addition-ablation.yaml"))
    assert len(trials) == 12
    by_variant: dict[str, list] = {}
    for t in trials:
        by_variant.setdefault(t.assignments["variant"], []).append(t)
    assert sorted(by_variant) == ["baseline", "jsrr", "random_loop", "stars"]
    for variant, group in by_variant.items():
        assert sorted(t.spec.seed for t in group) == [0, 1, 2]
        s = group[0].spec.stars
        random_loop = variant in ("random_loop", "stars")
        assert (s.loop_sampling.kind == "lognormal") == random_loop, variant
        assert (s.jsrr.weight > 0) == (variant in ("jsrr", "stars")), variant
        assert group[0].spec.model.norm.position == "post_sandwich"


def test_the_norm_lambda_sweep_is_small_by_default_and_full_in_two_sets():
    """Each position comes with the embedding init it trains with (docs/results.md: pre-norm stalls
    with N(0, 1) embeddings, post_sandwich with N(0, 0.02)); the full sweep is the file's comment."""
    trials = sweep_trials(load("norm-lambda-sweep.yaml"))
    assert len(trials) == 8
    init = {t.spec.model.norm.position: (t.spec.model.embed_init_std, t.spec.model.tie_word_embeddings) for t in trials}
    assert init == {"pre": (0.02, True), "post_sandwich": (1.0, False)}
    comment = (JOBS / "norm-lambda-sweep.yaml").read_text().split("#   starsctl submit")[1].split("\nname:")[0]
    command = " ".join(line.lstrip("# ").rstrip(" \\") for line in comment.splitlines())
    sets = re.findall(r"--set '([^']*)'", command)
    assert len(sets) == 2
    trials = sweep_trials(load_spec(JOBS / "norm-lambda-sweep.yaml", sets))
    assert len(trials) == 60
    assert {(t.spec.model.norm.type, t.spec.model.norm.position, t.spec.stars.jsrr.weight) for t in trials} == {
        (ty, pos, w) for ty in ("layernorm", "rmsnorm", "simplenorm")
        for pos in ("pre", "post", "pre_sandwich", "post_sandwich") for w in (0.0, 0.01, 0.03, 0.1, 0.3)}


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_validate_and_dry_run_agree_on_every_job(path, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stars.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()
    validated = runner.invoke(app, ["validate", str(path)])
    dry = runner.invoke(app, ["submit", str(path), "--dry-run"])
    assert validated.exit_code == 0 and dry.exit_code == 0, validated.output + dry.output
    from stars.spec import resolve_spec

    printed = JobSpec.model_validate(yaml.safe_load(dry.stdout))
    assert printed == resolve_spec(load_spec(path), cwd=tmp_path)  # the spec validate accepted, resolved
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written
