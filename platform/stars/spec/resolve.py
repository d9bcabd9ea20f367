"""Resolution and identity of a job spec.

- `resolve_spec` fills what depends on where the job is started: absolute local paths and the
  tracking URI. The resolved spec (`resolved_yaml`) is what a job runs and what is saved with its
  MLflow run.
- `spec_hash` is the job's resume identity: a hash of exactly the fields that change what training
  computes. A run directory is keyed by it, so changing one of those fields starts fresh, and
  changing any other field resumes from the latest checkpoint.

What `spec_hash` covers (`COMPUTING_FIELDS`, minus the carve-outs in `NON_COMPUTING_FIELDS`):

| field | computes? | why |
|---|---|---|
| `seed` | yes | initialisation, data order, loop depths, dropout |
| `model` | yes | architecture, checkpoint, weights' dtype, trust_remote_code (which code runs) |
| `data` | yes, but `num_proc` | the examples trained on; `num_proc` only parallelises tokenization |
| `stars` | yes | the depth sequence and the JSRR penalty |
| `train` | yes, but `log_every`, `checkpoint_every`, `keep_checkpoints`, `gradient_checkpointing` | the optimisation; the four only say how often to log/save and how to trade memory for recompute (the same math, and dropout masks are replayed) |
| `resources.num_workers` | yes | each rank draws its own dropout/JSRR randomness, and the batch split changes |
| `resources.use_gpu` | yes | CPU and GPU kernels round differently |
| `name`, `experiment`, `description`, `tracking` | no | they name the job or say where it is logged |
| `eval` | no | evaluation reads checkpoints; it never changes training |
| `sweep` | no | a trial's spec has its point applied already (its sweep is empty) |
| the rest of `resources` | no | where and with how much hardware it runs (storage, CPUs/GPUs per worker, accelerator type, custom resources, placement, restarts, env vars and forwarded env var names) |
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from stars.spec.job import JobSpec
from stars.spec.paths import absolute_path, is_local_path, is_path_like
from stars.spec.redaction import redact_tree

__all__ = [
    "COMPUTING_FIELDS",
    "NON_COMPUTING_FIELDS",
    "computing_view",
    "default_tracking_uri",
    "is_local_store",
    "resolve_spec",
    "resolved_yaml",
    "spec_hash",
    "spec_warnings",
]

#: Dotted paths whose values change what training computes (a path covers everything under it).
COMPUTING_FIELDS: tuple[str, ...] = (
    "seed",
    "model",
    "data",
    "stars",
    "train",
    "resources.num_workers",
    "resources.use_gpu",
)
#: Dotted paths that do not change what training computes, including the carve-outs from
#: `COMPUTING_FIELDS` (a path absent from a spec, e.g. `data.num_proc` of an addition job, is skipped).
NON_COMPUTING_FIELDS: tuple[str, ...] = (
    "name",
    "experiment",
    "description",
    "eval",
    "sweep",
    "tracking",
    "data.num_proc",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.gradient_checkpointing",
    "resources.accelerator_type",
    "resources.cpus_per_worker",
    "resources.gpus_per_worker",
    "resources.resources_per_worker",
    "resources.placement_strategy",
    "resources.storage_path",
    "resources.max_failures",
    "resources.env_vars",
    "resources.forward_env",
)


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The default local MLflow store: `sqlite:///<cwd>/mlflow.db` (absolute path).

    MLflow 3 made SQLite its default store and refuses the `./mlruns` file store unless
    MLFLOW_ALLOW_FILE_STORE is set; artifacts of this store go to `<cwd>/mlruns`.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def is_local_store(uri: str) -> bool:
    """Whether a tracking URI is a store on this machine (sqlite file, file store, plain path)."""
    return uri.startswith(("sqlite:", "file:")) or is_path_like(uri)


def _local_if_present(name: str, base: Path) -> str:
    """`name` made absolute when it names an existing local path (relative to `base`), else as given
    (a hub id such as `ByteDance/Ouro-1.4B`, or a path that exists only where the job runs)."""
    candidate = Path(name).expanduser()
    candidate = candidate if candidate.is_absolute() else base / candidate
    return str(candidate.resolve()) if is_local_path(name) and candidate.exists() else name


def resolve_spec(spec: JobSpec, cwd: str | Path | None = None) -> JobSpec:
    """The spec with everything that depends on where it is started made explicit: local paths
    absolute against `cwd` (default: the working directory), the tracking URI chosen
    (spec, else $MLFLOW_TRACKING_URI, else `default_tracking_uri`) and, for a local store, the
    artifact location. Idempotent."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    data = spec.model_dump(mode="json")
    res = data["resources"]
    if is_local_path(res["storage_path"]):
        res["storage_path"] = absolute_path(res["storage_path"], base)
    d = data["data"]
    for key in ("train_file", "test_file"):
        if d.get(key):
            d[key] = absolute_path(d[key], base)
    # Names that are a local path or a hub id: absolute when they exist here, else left as ids.
    for section, key in (("model", "pretrained"), ("data", "dataset"), ("data", "tokenizer")):
        if data[section].get(key):
            data[section][key] = _local_if_present(data[section][key], base)
    paths = data["eval"]["benchmark_paths"]
    data["eval"]["benchmark_paths"] = {
        name: absolute_path(p, base) if is_local_path(p) else p for name, p in paths.items()
    }
    tr = data["tracking"]
    if tr["uri"] is None:
        tr["uri"] = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(base)
    uri = tr["uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        tr["uri"] = "sqlite:///" + absolute_path(uri[len("sqlite:///") :], base)
    elif is_path_like(uri):
        tr["uri"] = absolute_path(uri, base)
    if tr["artifact_location"] is None and is_local_store(tr["uri"]):
        tr["artifact_location"] = str((base / "mlruns").resolve())
    elif tr["artifact_location"] and is_local_path(tr["artifact_location"]):
        tr["artifact_location"] = absolute_path(tr["artifact_location"], base)
    return JobSpec.model_validate(data)


def resolved_yaml(spec: JobSpec, *, redact: bool = False) -> str:
    """The spec as YAML, every field explicit, in schema order; loads back to an equal spec.

    `redact=True` (what is logged to MLflow and what `starsctl submit --dry-run` and
    `validate --show` print) replaces values under secret-looking keys (`is_secret_key`, e.g.
    `resources.env_vars.HF_TOKEN`) by `<redacted>`, and passwords inside URIs too."""
    data = spec.model_dump(mode="json")
    header = f"# resolved STARS job spec; spec_hash {spec_hash(spec)}\n"
    if redact:
        data = redact_tree(data)
        header += "# values of secret-looking keys are redacted\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=100)


def _pop_path(data: dict[str, Any], keys: list[str]) -> None:
    node: Any = data
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(keys[-1], None)


def computing_view(spec: JobSpec) -> dict[str, Any]:
    """The part of the spec that `spec_hash` covers: `COMPUTING_FIELDS` without the
    `NON_COMPUTING_FIELDS` carved out of them."""
    dumped = spec.model_dump(mode="json")
    view: dict[str, Any] = {}
    for path in COMPUTING_FIELDS:
        keys = path.split(".")
        node: Any = dumped
        for k in keys:
            node = node[k]
        target = view
        for k in keys[:-1]:
            target = target.setdefault(k, {})
        target[keys[-1]] = copy.deepcopy(node)
    for path in NON_COMPUTING_FIELDS:
        _pop_path(view, path.split("."))
    return view


def spec_hash(spec: JobSpec) -> str:
    """16 hex digits identifying what the job computes: a SHA-256 of the canonical JSON of
    `computing_view(spec)` (see the module docstring for which fields count and why). Equal specs
    started from different directories, logged elsewhere, or run with other checkpoint intervals
    hash equally."""
    text = json.dumps(computing_view(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_warnings(spec: JobSpec, address: str | None = None) -> list[str]:
    """Things that validate but are probably wrong (printed, never fatal)."""
    out: list[str] = []
    remote = address is not None and not address.startswith(("local", "127.0.0.1", "localhost"))
    if remote and is_local_path(spec.resources.storage_path):
        out.append(
            f"resources.storage_path {spec.resources.storage_path!r} is a local path but the job goes "
            f"to {address}: every node of a multi-node cluster must see it (shared filesystem or s3://...)"
        )
    uri = spec.tracking.uri or ""
    if remote and spec.tracking.enabled and uri == "":
        out.append(
            "tracking.uri is not set: the job reports to the cluster's $MLFLOW_TRACKING_URI (and is refused "
            "there when that is unset); name your tracking server to be sure where the runs go"
        )
    elif remote and spec.tracking.enabled and is_local_store(uri):
        out.append(
            f"tracking.uri {uri!r} is local to the machine the job runs on; give a tracking server URI "
            "to see the runs from here"
        )
    if spec.model.dtype != "float32" and spec.train.lr < 1e-4:
        out.append(
            f"model.dtype {spec.model.dtype!r} with train.lr {spec.train.lr:g}: most updates round to zero "
            "in 16-bit weights; keep model.dtype float32 and use train.precision bf16"
        )
    if spec.stars.jsrr.enabled and spec.stars.jsrr.start_step >= (spec.train.max_steps or 1 << 62):
        out.append("stars.jsrr.start_step >= train.max_steps: JSRR never turns on")
    return out
