"""Shared fixtures. Ray takes 10-25 s to start on the 2-core CI machine: one local cluster per session."""

from __future__ import annotations

import os

import pytest

# Tests train tiny models; more threads than cores only adds contention between Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray per test module (4 logical CPUs: 2 training workers + driver-side actors).

    Per module, not per session: a run whose driver a test kills on purpose (tests/ray_backend/
    test_sweep.py) can leave Ray Train's bookkeeping behind, and after many modules a later job's
    controller waited forever for resources; a fresh Ray per module costs ~10 s each.

    The dashboard stays on (bound to 127.0.0.1): without it Ray's state API fails, and Ray Train's
    placement-group cleaner can take that failure for a dead controller and tear down a live run."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def tiny_spec(tmp_path):
    """Factory of a tiny addition JobSpec that stores everything under tmp_path.

    `tiny_spec(**{"train.max_steps": 30, "resources.num_workers": 2})` sets dotted fields.
    """
    from stars.spec import JobSpec

    def make(**dotted):
        data = {
            "name": "tiny",
            "seed": 0,
            "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_block": 1, "injection": "add",
                      "max_position_embeddings": 24,
                      "norm": {"type": "layernorm", "position": "post_sandwich"}},
            "data": {"task": "addition", "digits": 2, "num_train": 2000, "num_test": 64, "seed": 0},
            "stars": {"loop_sampling": {"kind": "lognormal", "mu": 1.0, "sigma": 0.5, "min": 1, "max": 4},
                      "jsrr": {"weight": 0.1, "mode": "vjp", "start_step": 0}},
            "train": {"max_steps": 12, "global_batch_size": 16, "lr": 3e-3, "warmup_steps": 2,
                      "schedule": "cosine", "checkpoint_every": 6, "log_every": 2},
            "resources": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(tmp_path / "runs")},
            "eval": {"tasks": ["addition"], "depths": "1-4", "limit": 32},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "mlruns")},
        }
        for dotted_key, value in dotted.items():
            node = data
            *parents, leaf = dotted_key.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return JobSpec.model_validate(data)

    return make
