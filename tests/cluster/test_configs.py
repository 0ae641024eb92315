"""cluster/: the KubeRay manifests, the `ray up` config, the Dockerfile and local_cluster.sh.

Nothing here starts a cluster: the manifests are checked for structure and against the schemas
Ray ships (the cluster launcher's JSON schema, Serve's config schema), the commands they run are
parsed by medkd's own CLI, and the shell script is checked for syntax and for refusing bad ports
before it starts anything.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, free_port

CLUSTER_DIR = REPO_ROOT / "cluster"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
IMAGE = "medkd:latest"


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _by_kind(path: Path, kind: str) -> dict:
    matches = [doc for doc in _documents(path) if doc.get("kind") == kind]
    assert len(matches) == 1, f"{path.name}: expected one {kind}, found {len(matches)}"
    return matches[0]


def _ray_cluster_spec(doc: dict) -> dict:
    return {
        "RayCluster": lambda d: d["spec"],
        "RayJob": lambda d: d["spec"]["rayClusterSpec"],
        "RayService": lambda d: d["spec"]["rayClusterConfig"],
    }[doc["kind"]](doc)


def _ray_containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [group["template"]["spec"]["containers"][0] for group in groups]


def _env(container: dict) -> dict:
    return {item["name"]: item for item in container.get("env", [])}


@pytest.mark.parametrize(
    "path", sorted(CLUSTER_DIR.rglob("*.yaml")), ids=lambda p: p.relative_to(CLUSTER_DIR).as_posix()
)
def test_every_yaml_file_parses(path):
    documents = _documents(path)
    assert documents, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in documents)


@pytest.mark.parametrize(
    "path, kind",
    [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"), ("rayservice.yaml", "RayService")],
)
def test_kuberay_resources_share_image_version_and_token_auth(path, kind):
    import ray

    doc = _by_kind(KUBERAY_DIR / path, kind)
    assert doc["apiVersion"] == "ray.io/v1"
    cluster = _ray_cluster_spec(doc)
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    containers = _ray_containers(cluster)
    assert [container["image"] for container in containers] == [IMAGE] * len(containers)
    # KubeRay >= 1.7.0 wires the token of this secret into every Ray container and the autoscaler.
    assert cluster["authOptions"] == {"mode": "token", "secretName": "medkd-ray-auth"}
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_raycluster_has_head_gpu_and_cpu_groups_and_a_reachable_cache():
    cluster = _by_kind(KUBERAY_DIR / "raycluster.yaml", "RayCluster")["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and gpu["requests"]["nvidia.com/gpu"] == 1
    assert groups["gpu"]["minReplicas"] == 0  # GPUs only while there is work for them
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    service = _by_kind(KUBERAY_DIR / "raycluster.yaml", "Service")
    deployment = _by_kind(KUBERAY_DIR / "raycluster.yaml", "Deployment")
    assert service["metadata"]["name"] == "medkd-redis"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    claims = {
        doc["metadata"]["name"]
        for doc in _documents(KUBERAY_DIR / "raycluster.yaml")
        if doc["kind"] == "PersistentVolumeClaim"
    }
    mounted = {
        volume["persistentVolumeClaim"]["claimName"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for volume in group["template"]["spec"].get("volumes", [])
        if "persistentVolumeClaim" in volume
    }
    assert mounted <= claims


def test_rayjob_entrypoint_is_a_valid_medkd_run_of_a_baked_in_example():
    from medkd.cli.main import build_parser
    from medkd.spec.job import load_spec, parse_override

    job = _by_kind(KUBERAY_DIR / "rayjob.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["medkd", "run"]
    args = build_parser().parse_args(argv[1:])
    assert args.handler == "medkd.cli.run:run" and args.no_serve
    spec_in_image = Path(args.spec)
    assert spec_in_image.parts[:3] == ("/", "app", "examples")  # cluster/Dockerfile copies examples/ to /app
    local_spec = REPO_ROOT / "examples" / spec_in_image.name
    assert local_spec.is_file(), f"{local_spec} is not in the repository"
    overrides = dict(parse_override(text) for text in args.set)
    spec = load_spec(local_spec, overrides=overrides)
    assert str(spec.output_dir).startswith("/shared/")  # on the shared volume, not in the job's temp dir
    assert spec.cache.redis_url == "redis://medkd-redis:6379/0"
    env_names = set(_env(_ray_containers(job["spec"]["rayClusterSpec"])[1]))
    assert spec.cache.password_env in env_names
    submitter_env = _env(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
    assert submitter_env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in submitter_env


def test_rayservice_serve_config_passes_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    from medkd.spec.serve import ServeConfig

    service = _by_kind(KUBERAY_DIR / "rayservice.yaml", "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert config.http_options.host == "0.0.0.0"
    (application,) = config.applications
    module_name, _, builder_name = application.import_path.partition(":")
    assert module_name == "medkd.serve.app" and builder_name
    assert Path(application.args["model_dir"]).is_absolute()
    ServeConfig(**application.args.get("serve", {}))  # the builder's keys are ServeConfig fields
    # No per-deployment overrides: the builder names and configures its deployments from
    # args.serve (an override of a deployment name the builder does not create fails the deploy).
    assert application.deployments == []
    serve_config = ServeConfig(**application.args["serve"])
    assert 1 <= serve_config.min_replicas <= serve_config.max_replicas == 8

    import importlib

    module = importlib.import_module(module_name)
    assert callable(getattr(module, builder_name, None)), f"{application.import_path} is not a builder"


def test_ray_up_config_passes_the_cluster_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER_DIR / "ray-up.yaml").read_text())
    validate_config(prepare_config(raw))
    nodes = raw["available_node_types"]
    assert raw["head_node_type"] in nodes
    gpu_types = [
        node["node_config"]["InstanceType"]
        for name, node in nodes.items()
        if name != raw["head_node_type"] and node["node_config"]["InstanceType"][0] in "gp"
    ]
    assert gpu_types, "no GPU worker type (g*/p* instances)"
    commands = " ".join(raw["setup_commands"])
    assert "-e ~/medkd" in commands and "--python 3.11" in commands
    assert raw["file_mounts"]["~/medkd"] == "."
    assert "**/.venv" in raw["rsync_exclude"]
    for command in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "ray stop" not in command
    assert all(
        "RAY_AUTH_MODE=token" in c
        for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
        if "ray start" in c
    )


def test_ray_up_config_keeps_secrets_off_command_lines_and_pipes_nothing_into_a_shell():
    """The Redis password never appears on a command line (where `ps` shows it) nor in .bashrc,
    and nothing downloaded is piped into a shell."""
    raw = yaml.safe_load((CLUSTER_DIR / "ray-up.yaml").read_text())
    command_keys = [key for key in raw if key.endswith("_commands")]
    commands = [command for key in command_keys for command in raw[key]]
    assert commands
    for command in commands:
        assert not re.search(r"(curl|wget)[^|;&]*\|\s*(ba|z)?sh\b", command), (
            f"pipes a download into a shell: {command}"
        )
        assert ".bashrc" not in command or "PASSWORD" not in command, f"puts a secret into .bashrc: {command}"
        assert not re.search(r"--requirepass\s", command), f"password on redis-server's command line: {command}"
        assert not re.search(r"redis-cli[^;|&]*\s-a\s", command), f"password on redis-cli's command line: {command}"
        # The file's content may only become an environment variable or go through bash's printf
        # builtin into a 0600 file, never an argument of a program.
        for match in re.finditer(r"\$\(cat ~/\.medkd/redis_password\)", command):
            before = command[: match.start()]
            assert re.search(r"([A-Z_]+=\"|printf 'requirepass \"%s\"\\n' \")$", before), command


def test_dockerfile_copies_files_that_exist():
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    sources = [part for line in re.findall(r"^COPY (.+)$", dockerfile, re.M) for part in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert (CLUSTER_DIR / "Dockerfile.dockerignore").is_file()


def test_local_cluster_script_syntax_and_refusals(tmp_path):
    script = CLUSTER_DIR / "local_cluster.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "MEDKD_CLUSTER_DIR": str(tmp_path / "state")}
    usage = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    in_worker_range = subprocess.run(
        [str(script), "start", "1"], env={**env, "MEDKD_CLUSTER_PORT": "15000"}, capture_output=True, text=True
    )
    assert in_worker_range.returncode == 1
    assert "MEDKD_CLUSTER_PORT=15000 lies in Ray's worker port range" in in_worker_range.stderr
    assert not (tmp_path / "state").exists()  # refused before starting anything
    not_running = subprocess.run([str(script), "stop"], env=env, capture_output=True, text=True)
    assert not_running.returncode == 0 and "not running" in not_running.stdout


def _conf_settings(lines: list[str]) -> dict[str, str]:
    pairs = [line.strip().split(None, 1) for line in lines if line.strip() and not line.strip().startswith("#")]
    return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}


def _managed_server_settings(tmp_path: Path) -> dict[str, str]:
    from medkd.softlabels.redis_server import ManagedRedisServer

    return _conf_settings(ManagedRedisServer(data_dir=tmp_path / "managed")._config_text(6379, "x").splitlines())


@pytest.mark.integration  # starts a real redis-server with the manifest's settings
def test_kubernetes_redis_follows_the_caches_eviction_design_and_really_starts(tmp_path):
    """The Deployment's own start command and readiness probe, run here on a real redis-server
    with the manifest's redis.conf (only paths and the port changed): the password comes from
    the secret's file, eviction is the managed server's ``volatile-lru`` under a ``maxmemory``
    below the container's memory limit, and the probe tells a right password from a wrong one."""
    import redis

    documents = _documents(KUBERAY_DIR / "raycluster.yaml")
    conf = _by_kind(KUBERAY_DIR / "raycluster.yaml", "ConfigMap")["data"]["redis.conf"]
    settings, managed = _conf_settings(conf.splitlines()), _managed_server_settings(tmp_path)
    for key in ("maxmemory-policy", "save", "appendonly", "rdbchecksum", "stop-writes-on-bgsave-error"):
        assert settings[key] == managed[key], key
    (container,) = _by_kind(KUBERAY_DIR / "raycluster.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    limit_gib = int(container["resources"]["limits"]["memory"].removesuffix("Gi"))
    assert settings["maxmemory"].endswith("gb") and int(settings["maxmemory"][:-2]) < limit_gib  # room for the RDB fork
    assert "REDIS_PASSWORD" not in json.dumps(container.get("env", [])) and "--requirepass" not in json.dumps(container)
    volumes = {
        v["name"]: v
        for v in _by_kind(KUBERAY_DIR / "raycluster.yaml", "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["secret"]["secret"]["secretName"] == "medkd-redis"  # the secret the README has users create
    assert container["livenessProbe"] and container["readinessProbe"]
    assert any(doc["kind"] == "Service" and doc["metadata"]["name"] == "medkd-redis" for doc in documents)

    port = free_port()
    secret_dir, auth_dir, data_dir, conf_dir = (tmp_path / name for name in ("secret", "auth", "data", "conf"))
    for directory in (secret_dir, auth_dir, data_dir, conf_dir):
        directory.mkdir()
    (secret_dir / "password").write_text("s3cret-from-the-secret")
    local = {
        "/etc/medkd-redis-secret": str(secret_dir),
        "/run/medkd-redis": str(auth_dir),
        "/etc/medkd-redis/": f"{conf_dir}/",
        "dir /data": f"dir {data_dir}",
        "port 6379": f"port {port}",
        "bind 0.0.0.0": "bind 127.0.0.1",
        "-p 6379": f"-p {port}",
    }

    def localize(text: str) -> str:
        for old, new in local.items():
            text = text.replace(old, new)
        return text

    (conf_dir / "redis.conf").write_text(localize(conf))
    assert container["command"] == ["sh", "-c"]
    server = subprocess.Popen(
        ["sh", "-c", localize(container["args"][0])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password="s3cret-from-the-secret")
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == int(settings["maxmemory"][:-2]) * 1024**3
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        assert oct((auth_dir / "auth.conf").stat().st_mode & 0o777) == "0o600"
        probe = [localize(part) for part in container["readinessProbe"]["exec"]["command"]]
        assert subprocess.run(probe, capture_output=True).returncode == 0
        (secret_dir / "password").write_text("not-the-password")
        assert subprocess.run(probe, capture_output=True).returncode != 0
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_ray_up_redis_follows_the_caches_eviction_design(tmp_path):
    raw = yaml.safe_load((CLUSTER_DIR / "ray-up.yaml").read_text())
    (writer,) = [command for command in raw["head_setup_commands"] if "redis.conf" in command]
    lines = [a or b for a, b in re.findall(r"'([^']*)'|\"([^\"]*)\"", writer.split("printf", 1)[1])][1:]
    settings, managed = _conf_settings(lines), _managed_server_settings(tmp_path)
    for key in ("maxmemory-policy", "save", "appendonly"):
        assert settings[key] == managed[key], key
    assert settings["maxmemory"] and settings["port"] == "6380"
    assert any("systemctl disable --now redis-server" in command for command in raw["head_setup_commands"])
