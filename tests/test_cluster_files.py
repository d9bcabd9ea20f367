"""The cluster and container configs (cluster/, docker/) checked on a machine without Docker, Kubernetes
or GPUs: the launcher config through Ray's own config preparation and schema, the KubeRay manifests
against KubeRay's CRD schemas (tests/fixtures/kuberay/), plain Kubernetes objects against Kubernetes'
schemas (kubernetes-validate), one Ray version everywhere, entrypoints that exist, secrets only from
cluster-side secrets, and a cluster that can hold jobs/stars_numina.yaml.

cluster/mlflow/ has its own files and tests and is left out here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
import zipfile
from functools import cache
from importlib.metadata import version as installed_version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from stars.spec import is_secret_key, load_spec

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKER = ROOT / "docker"
LAUNCHER_CONFIG = CLUSTER / "ray-cluster.yaml"
KUBERAY = CLUSTER / "kuberay"
CRD_FIXTURES = Path(__file__).parent / "fixtures" / "kuberay"
OTHER_OWNER = CLUSTER / "mlflow"
NUMINA_JOB = ROOT / "jobs" / "stars_numina.yaml"
#: Kubernetes release the plain objects (PersistentVolume, PersistentVolumeClaim, ...) are checked against.
KUBERNETES_VERSION = "1.30.0"
#: Settings whose names look secret to `is_secret_key` but that hold none.
NOT_SECRETS = {"RAY_AUTH_MODE"}
SHARED_MOUNT = "/mnt/shared"
ACCELERATOR_RESOURCE = "accelerator_type:A800"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB: C parser when there is one


def our_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and OTHER_OWNER not in p.parents)


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
MANIFEST_DOCS = [(path, i, doc) for path in MANIFESTS for i, doc in enumerate(yaml_documents(path))]
RAY_DOCS = [(p, i, d) for p, i, d in MANIFEST_DOCS if d["apiVersion"].startswith("ray.io/")]
PLAIN_DOCS = [(p, i, d) for p, i, d in MANIFEST_DOCS if not d["apiVersion"].startswith("ray.io/")]


def doc_id(item: tuple[Path, int, dict]) -> str:
    path, _, doc = item
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


def manifest(kind: str) -> dict:
    (doc,) = [d for _, _, d in MANIFEST_DOCS if d["kind"] == kind]
    return doc


def launcher_config() -> dict:
    return yaml.safe_load(LAUNCHER_CONFIG.read_text(encoding="utf-8"))


def walk(node: Any):
    """Every dict inside `node`, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def containers(doc: dict) -> list[dict]:
    return [c for d in walk(doc) for key in ("containers", "initContainers") for c in d.get(key, [])]


def ray_cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster spec(s) a KubeRay object defines (a RayCluster's `spec`, a RayJob's `rayClusterSpec`)."""
    spec = doc["spec"]
    return [spec["rayClusterSpec"]] if doc["kind"] == "RayJob" else [spec]


def quantity(value: str | int) -> float:
    """A Kubernetes CPU/GPU quantity as a number (`"8"`, `8`, `"500m"`)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- every file is read and checked --------------------------------------------------------------------


def test_every_file_under_cluster_and_docker_has_a_check():
    """A new file here needs a check in this module (and this list)."""
    checked = {LAUNCHER_CONFIG, *MANIFESTS, CLUSTER / "README.md",
               DOCKER / "Dockerfile", DOCKER / "Dockerfile.dockerignore", DOCKER / "README.md"}
    unchecked = [str(p.relative_to(ROOT)) for p in our_files(CLUSTER) + our_files(DOCKER) if p not in checked]
    assert unchecked == []
    assert all(p.exists() for p in checked)


@pytest.mark.parametrize("path", [p for p in our_files(CLUSTER) + our_files(DOCKER) if p.suffix == ".yaml"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses_into_objects(path):
    docs = yaml_documents(path)
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", [CLUSTER / "README.md", DOCKER / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_links_and_repo_paths_exist(path):
    text = path.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)\)", text)
    repo_paths = re.findall(r"`((?:cluster|docker|jobs|tests|platform)/[\w./-]+)`", text)
    missing = [link for link in links if "://" not in link and not (path.parent / link).exists()]
    missing += [p for p in repo_paths if not (ROOT / p).exists()]
    assert missing == []


# --- the Ray cluster launcher config ---------------------------------------------------------------------


def bootstrap(config: dict) -> dict:
    """What `ray up` does with a config before it touches any host: fill in the provider's defaults,
    turn the on-prem config into Ray's single node type, validate against ray/autoscaler/ray-schema.json
    and Ray's own rules, bootstrap the provider (a no-op for `local`)."""
    from ray.autoscaler._private.commands import _bootstrap_config

    return _bootstrap_config(copy.deepcopy(config), no_config_cache=True)


def test_launcher_config_passes_rays_own_validation():
    config = launcher_config()
    resolved = bootstrap(config)
    assert resolved["provider"]["type"] == "local"
    (node_type,) = resolved["available_node_types"].values()  # Ray's one on-prem node type
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"])


def misspelled_launcher_field(config: dict) -> None:  # ray-schema.json allows no unknown top-level field
    config["worker_start_commands"] = config.pop("worker_start_ray_commands")


def launcher_node_types(config: dict) -> None:
    # Why the node roles are set in the `ray start` lines: the local provider refuses node types.
    config["available_node_types"] = {"a800": {"node_config": {}, "resources": {"GPU": 8}}}


def command_as_mapping(config: dict) -> None:
    # The YAML slip the worker's block scalar avoids: `"a": 1` in a plain scalar makes a mapping.
    config["worker_start_ray_commands"][1] = {"ray start --resources='{\"accelerator_type:A800\"": "1}'"}


@pytest.mark.parametrize("breakage, message", [
    (misspelled_launcher_field, "'worker_start_commands' was unexpected"),
    (launcher_node_types, "available_node_types is not supported"),
    (command_as_mapping, "is not of type 'string'"),
], ids=["misspelled_field", "node_types", "command_as_mapping"])
def test_a_broken_launcher_config_fails_rays_validation(breakage, message):
    config = launcher_config()
    breakage(config)
    with pytest.raises(Exception, match=message):
        bootstrap(config)


def ray_start_options(command: str) -> dict[str, str]:
    """`--name=value` / `--flag` options of the `ray start` in a shell command line."""
    words = shlex.split(command.split("ray start", 1)[1])
    return dict((w[2:].split("=", 1) + [""])[:2] for w in words if w.startswith("--"))


def docker_options(options: list[str]) -> list[tuple[str, str]]:
    """(flag, value) pairs of `docker run` options written as `--flag value` or `--flag=value`."""
    words = [w for option in options for w in shlex.split(option)]
    pairs = []
    for i, word in enumerate(words):
        if word.startswith("-"):
            flag, _, value = word.partition("=")
            if not value and i + 1 < len(words) and not words[i + 1].startswith("-"):
                value = words[i + 1]
            pairs.append((flag, value))
    return pairs


def start_command(config: dict, role: str) -> str:
    (command,) = [c for c in config[f"{role}_start_ray_commands"] if "ray start" in c]
    return command


def test_launcher_head_runs_no_training_and_workers_offer_a800_gpus():
    config = launcher_config()
    head = ray_start_options(start_command(config, "head"))
    worker = ray_start_options(start_command(config, "worker"))
    assert head["num-gpus"] == "0" and "resources" not in head
    assert json.loads(worker["resources"])[ACCELERATOR_RESOURCE] > 0
    assert "num-gpus" not in worker  # Ray counts every GPU the container sees
    docker = config["docker"]
    assert ("--gpus", "all") in docker_options(docker["worker_run_options"])
    assert ("--env", "NVIDIA_VISIBLE_DEVICES=void") in docker_options(docker["head_run_options"])


def test_launcher_has_token_auth_shared_storage_and_no_literal_secrets():
    config = launcher_config()
    options = docker_options(config["docker"]["run_options"])
    assert ("--env", "RAY_AUTH_MODE=token") in options
    volumes = [value.split(":")[:2] for flag, value in options if flag in ("-v", "--volume")]
    assert [SHARED_MOUNT, SHARED_MOUNT] in volumes  # same path on the host and in every container
    assert any(SHARED_MOUNT in c and "mountpoint" in c for c in config["initialization_commands"])
    env_names = [value.split("=")[0] for flag, value in options if flag in ("-e", "--env")]
    assert [n for n in env_names if is_secret_key(n) and n not in NOT_SECRETS] == []
    assert any(flag == "--env-file" for flag, _ in options)  # the secrets come from the hosts


# --- KubeRay manifests against KubeRay's CRDs -------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The schema with unknown fields rejected, as `kubectl apply` (strict field validation) rejects them:
    every object that lists its properties and neither sets `additionalProperties` nor keeps unknown
    fields (`x-kubernetes-preserve-unknown-fields`) gets `additionalProperties: false`."""
    for node in walk(schema):
        if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict openAPIV3Schema, from the CRD fixtures."""
    schemas = {}
    for path in sorted(CRD_FIXTURES.glob("*.yaml")):
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER)
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def crd_problems(doc: dict) -> list[str]:
    schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    assert schema is not None, f"no CRD fixture for {doc['apiVersion']} {doc['kind']} in {CRD_FIXTURES}"
    errors = jsonschema.Draft4Validator(schema).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_crd_fixtures_are_the_unmodified_files_their_readme_names():
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")} <= set(crd_schemas())
    readme = (CRD_FIXTURES / "README.md").read_text(encoding="utf-8")
    assert re.search(r"\bv\d+\.\d+\.\d+\b", readme) and re.search(r"\b[0-9a-f]{40}\b", readme)
    for path in CRD_FIXTURES.glob("*.yaml"):
        assert f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}" in readme


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_kuberay_manifest_validates_against_the_crd(item):
    _, _, doc = item
    assert crd_problems(doc) == []


def misspelled_pod_field(rc: dict) -> None:
    rc["workerGroupSpecs"][0]["template"]["spec"]["nodeSelecter"] = {"gpu": "a800"}


def gpu_count_in_words(rc: dict) -> None:
    rc["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "eight"


def unknown_auth_mode(rc: dict) -> None:
    rc["authOptions"]["mode"] = "on"


def nameless_worker_group(rc: dict) -> None:
    del rc["workerGroupSpecs"][0]["groupName"]


@pytest.mark.parametrize("breakage, where", [
    (misspelled_pod_field, "nodeSelecter"), (gpu_count_in_words, "nvidia.com/gpu"),
    (unknown_auth_mode, "authOptions.mode"), (nameless_worker_group, "groupName"),
], ids=lambda x: getattr(x, "__name__", None))
@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_a_broken_kuberay_manifest_fails_validation(item, breakage, where):
    broken = copy.deepcopy(item[2])
    for rc in ray_cluster_specs(broken):
        breakage(rc)
    problems = crd_problems(broken)
    assert problems and any(where in p for p in problems), problems


def operator_problems(rc: dict) -> list[str]:
    """A few checks the KubeRay operator makes itself when it admits a cluster (ValidateRayClusterSpec in
    ray-operator/controllers/ray/utils/validation.go of the fixtures' release), not in the CRD schema."""
    problems = []
    groups = [("head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc.get("workerGroupSpecs", [])]
    for name, group in groups:
        params = group.get("rayStartParams") or {}
        if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
            problems.append(f"{name}: resources set both in rayStartParams and resources")
    for group in rc.get("workerGroupSpecs", []):
        if not 0 <= group["minReplicas"] <= group["maxReplicas"]:
            problems.append(f"{group['groupName']}: minReplicas must be in 0..maxReplicas")
    if (rc.get("authOptions") or {}).get("mode") == "token":
        major, minor = (int(x) for x in rc["rayVersion"].split(".")[:2])
        if (major, minor) < (2, 52):
            problems.append(f"token auth needs Ray >= 2.52, rayVersion is {rc['rayVersion']}")
    return problems


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_kuberay_manifest_passes_the_operators_own_checks(item):
    for rc in ray_cluster_specs(item[2]):
        assert operator_problems(rc) == []
        broken = copy.deepcopy(rc)
        broken["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = "8"
        broken["rayVersion"] = "2.51.0"
        assert len(operator_problems(broken)) == 2


def test_the_rayjobs_cluster_is_the_rayclusters():
    """rayjob.yaml carries a copy of raycluster.yaml's spec; they must not drift apart."""
    assert manifest("RayJob")["spec"]["rayClusterSpec"] == manifest("RayCluster")["spec"]


@pytest.mark.parametrize("item", RAY_DOCS, ids=doc_id)
def test_kuberay_head_runs_no_training_and_workers_are_a800s(item):
    for rc in ray_cluster_specs(item[2]):
        head = rc["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert ACCELERATOR_RESOURCE not in (head.get("resources") or {})
        assert all("nvidia.com/gpu" not in str(c.get("resources")) for c in containers(head))
        assert rc["authOptions"]["mode"] == "token"
        for group in rc["workerGroupSpecs"]:
            assert float(group["resources"][ACCELERATOR_RESOURCE]) > 0
            assert "A800" in group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
            (worker,) = containers(group)
            resources = worker["resources"]
            assert quantity(resources["limits"]["nvidia.com/gpu"]) >= 1
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


# --- plain Kubernetes objects ------------------------------------------------------------------------------


@pytest.mark.parametrize("item", PLAIN_DOCS, ids=doc_id)
def test_plain_kubernetes_object_validates(item):
    kubernetes_validate.validate(item[2], KUBERNETES_VERSION, strict=True)


def test_a_broken_kubernetes_object_fails_validation():
    claim = copy.deepcopy(manifest("PersistentVolumeClaim"))
    claim["spec"]["storageClass"] = claim["spec"].pop("storageClassName")  # the field is storageClassName
    with pytest.raises(kubernetes_validate.ValidationError, match="storageClass"):
        kubernetes_validate.validate(claim, KUBERNETES_VERSION, strict=True)


def test_every_ray_pod_mounts_the_shared_claim_where_the_job_stores_checkpoints():
    claim = manifest("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    storage_path = load_spec(NUMINA_JOB).resources.storage_path
    assert storage_path.startswith(SHARED_MOUNT + "/")
    for _, _, doc in RAY_DOCS:
        for rc in ray_cluster_specs(doc):
            pods = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
            for pod in pods:
                (volume,) = [v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get(
                    "claimName") == claim["metadata"]["name"]]
                (container,) = pod["containers"]
                assert {"name": volume, "mountPath": SHARED_MOUNT} in container["volumeMounts"]


def test_secrets_reach_the_pods_only_from_kubernetes_secrets():
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    secret_names = set()
    for _, _, doc in MANIFEST_DOCS:
        for container in containers(doc):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if is_secret_key(env["name"]) or ref:
                    assert "value" not in env and ref, f"{container['name']}: {env['name']} needs a secretKeyRef"
                    secret_names.add(ref["name"])
                    assert env["name"] in readme  # the README says what to put in the Secret
    for _, _, doc in RAY_DOCS:
        secret_names.update(rc["authOptions"]["secretName"] for rc in ray_cluster_specs(doc))
    assert secret_names and all(f"kubectl create secret generic {name} " in readme for name in secret_names)
    assert "runtime env" in readme and "dashboard" in readme  # why secrets stay out of specs


# --- one Ray version ---------------------------------------------------------------------------------------


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for kind, arg in dockerfile() if kind == "ARG" and "=" in arg)


def pyproject() -> dict:
    import tomllib  # Python >= 3.11

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def images() -> dict[str, list[str]]:
    """Every image the cluster files run, by file."""
    docker = launcher_config()["docker"]
    found = {LAUNCHER_CONFIG.name: [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]}
    for path, _, doc in MANIFEST_DOCS:
        found.setdefault(path.name, []).extend(c["image"] for c in containers(doc))
    return {name: imgs for name, imgs in found.items() if imgs}


def test_one_ray_version_in_pyproject_dockerfile_and_cluster_files():
    ray_version = dockerfile_args()["RAY_VERSION"]
    (ray_requirement,) = [r for r in map(Requirement, pyproject()["project"]["dependencies"]) if r.name == "ray"]
    assert ray_requirement.specifier.contains(ray_version), f"pyproject's {ray_requirement} refuses {ray_version}"
    assert installed_version("ray") == ray_version, "`ray up` and the Jobs client must run the cluster's Ray"
    tag = f"{pyproject()['project']['version']}-ray{ray_version}"
    by_file = images()
    assert {LAUNCHER_CONFIG.name, "raycluster.yaml", "rayjob.yaml"} <= set(by_file)
    for name, imgs in by_file.items():
        assert all(image.split(":")[-1].startswith(tag) for image in imgs), (name, imgs)
    assert len({image for imgs in by_file.values() for image in imgs}) == 1, "one image for every node"
    for _, _, doc in RAY_DOCS:
        assert all(rc["rayVersion"] == ray_version for rc in ray_cluster_specs(doc))
    for readme in (DOCKER / "README.md", CLUSTER / "README.md"):
        assert tag in readme.read_text(encoding="utf-8")


def test_dockerfile_cuda_base_pinned_ray_and_torch_non_root_user():
    args = dockerfile_args()
    steps = dockerfile()
    (base,) = [arg for kind, arg in steps if kind == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)
    assert re.match(r"nvidia/cuda:[\d.]+-(base|runtime|cudnn-runtime)-|rayproject/ray:[\w.]+-(gpu|cu\d+)", base)
    runs = " ".join(arg for kind, arg in steps if kind == "RUN")
    assert '"ray[default,train,tune]==$RAY_VERSION"' in runs
    assert '"torch==$TORCH_VERSION"' in runs and "torch.version.cuda" in runs  # the build refuses CPU torch
    # The torch of the image is the one README.md pins for CPU machines, in its CUDA build.
    assert f"torch=={args['TORCH_VERSION']}" in (ROOT / "README.md").read_text(encoding="utf-8")
    user = [arg for kind, arg in steps if kind == "USER"][-1]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert re.search(rf"useradd .*--uid (\d+) .*\b{user}\b", runs)
    envs = " ".join(arg for kind, arg in steps if kind == "ENV")
    assert f"HOME=/home/{user}" in envs  # the cluster launcher reads HOME from the image's environment
    # docker/README.md's table of contents says what the build arguments say.
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert args["CUDA_IMAGE"] in readme and f"`{args['TORCH_VERSION']}`" in readme
    assert f"ray[default,train,tune]=={args['RAY_VERSION']}" in readme


def test_docker_build_context_holds_what_the_dockerfile_copies():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else stays out (checkpoints, mlflow.db, .git)
    sources = [w for kind, arg in dockerfile() if kind == "COPY" for w in arg.split()[:-1] if not w.startswith("--")]
    assert sources and set(sources) <= allowed
    assert all((ROOT / source).exists() for source in sources)


# --- entrypoints and the job they run ----------------------------------------------------------------------


def test_rayjob_entrypoint_runs_stars_run_on_the_spec_from_the_configmap():
    from stars.ray_backend.submit import ENTRYPOINT

    job = manifest("RayJob")["spec"]
    assert job["entrypoint"] == ENTRYPOINT  # what `starsctl submit --address` runs
    python, flag, module, spec_file, *_ = shlex.split(job["entrypoint"])
    assert (python, flag, module) == ("python", "-m", "stars.run")
    assert find_spec(module) is not None
    working_dir = yaml.safe_load(job["runtimeEnvYAML"])["working_dir"]
    pod = job["submitterPodTemplate"]["spec"]
    (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == working_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    items = volume["configMap"]["items"]
    assert [i["path"] for i in items] == [spec_file]
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    name, key = volume["configMap"]["name"], items[0]["key"]
    assert f"kubectl create configmap {name} --from-file={key}=jobs/" in readme


def test_a_configmap_mount_uploads_as_plain_files(tmp_path):
    """The RayJob hands the ConfigMap's mount to `ray job submit` as working_dir. A ConfigMap mount is
    symlinks into a hidden timestamped folder; Ray's packaging must still ship job.yaml as a file."""
    from ray._private.runtime_env.packaging import create_package

    mount = tmp_path / "mount"
    (mount / "..2026_01_01_00_00_00.1").mkdir(parents=True)
    (mount / "..2026_01_01_00_00_00.1" / "job.yaml").write_text("name: stars_numina\n")
    (mount / "..data").symlink_to("..2026_01_01_00_00_00.1")
    (mount / "job.yaml").symlink_to("..data/job.yaml")
    package = tmp_path / "package.zip"
    create_package(str(mount), package, include_gitignore=True)
    with zipfile.ZipFile(package) as zf:
        assert zf.read("job.yaml") == b"name: stars_numina\n"


def test_starsctl_commands_in_the_docs_exist():
    import typer.main

    from stars.cli import app

    assert pyproject()["project"]["scripts"]["starsctl"] == "stars.cli:app"
    commands = set(typer.main.get_command(app).commands)
    text = "".join((folder / "README.md").read_text(encoding="utf-8") for folder in (CLUSTER, DOCKER))
    code = "".join(re.findall(r"```\w*\n(.*?)```", text, flags=re.S))  # the commands, not the prose
    used = set(re.findall(r"^\s*starsctl (\w+)", code, flags=re.M))
    assert used and used <= commands, used - commands


def test_the_shipped_kuberay_cluster_holds_stars_numina():
    """jobs/stars_numina.yaml on the RayJob's cluster: every training worker and evaluator finds its
    GPUs, CPUs and accelerator type."""
    spec = load_spec(NUMINA_JOB)
    r, e = spec.resources, spec.eval
    need_gpus = r.num_workers * r.gpus_per_worker + e.workers * e.resources.gpus
    need_cpus = r.num_workers * r.cpus_per_worker + e.workers * e.resources.cpus
    (group,) = manifest("RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (worker,) = containers(group)
    node_gpus = quantity(worker["resources"]["limits"]["nvidia.com/gpu"])
    node_cpus = quantity(worker["resources"]["limits"]["cpu"])
    assert need_gpus <= group["replicas"] * node_gpus and need_cpus <= group["replicas"] * node_cpus
    assert max(r.gpus_per_worker, e.resources.gpus) <= node_gpus
    assert max(r.cpus_per_worker, e.resources.cpus) <= node_cpus
    for accelerator in {r.accelerator_type, e.resources.accelerator_type}:
        assert f"accelerator_type:{accelerator}" in group["resources"]
        assert f"accelerator_type:{accelerator}" in ray_start_options(start_command(launcher_config(), "worker"))[
            "resources"]
