"""deploy/kubernetes/: every manifest validated against pinned Kubernetes API schemas, and the
promises between them, the image and the LB checked one by one.

No cluster runs here. kubernetes-validate checks each object against the OpenAPI schema of a
pinned Kubernetes release, strictly (an unknown or misspelt field fails); what a schema
cannot see (probes on the admin port, a grace period longer than gunicorn's, labels that
tie the PodDisruptionBudget, the autoscaler and the Service to the Deployment, a ConfigMap
that the LB's own parser accepts) is asserted here, and the pod's container is started for
real with the Deployment's environment and the ConfigMap's file.
"""

from __future__ import annotations

import re
import secrets
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import psutil
import pytest
import requests
import yaml

from gol7lb.config import ConfigError, load_settings
from tests.dnsserver import TestDNS
from tests.image import dockerfile_user, env_vars, graceful_timeout
from tests.procs import LB, ROOT, free_port, lb_status, wait_until

K8S = ROOT / "deploy" / "kubernetes"
# The Kubernetes releases the manifests are validated against: the oldest one they support
# (the preStop `sleep` action is on by default from 1.30) and the newest the pinned
# kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
LABELS = {"app.kubernetes.io/name": "gol7lb", "app.kubernetes.io/component": "load-balancer"}


@cache
def documents(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def all_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in documents(path)]


def one(kind: str, path: Path | None = None) -> dict[str, Any]:
    found = [doc for p, doc in all_objects()
             if doc["kind"] == kind and (path is None or p == path)
             and (path is not None or p.parent == K8S)]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def deployment() -> dict[str, Any]:
    return one("Deployment")


def pod_spec() -> dict[str, Any]:
    return deployment()["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def container_env() -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container().get("env", [])}


def named_port(name: str) -> int:
    return next(p["containerPort"] for p in container()["ports"] if p["name"] == name)


def config_toml() -> str:
    data = one("ConfigMap")["data"]
    assert list(data) == ["lb.toml"]
    return data["lb.toml"]


def pod_env(config_path: Path, token: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it: plain values as written, the
    Secret's keys filled in, GOL7LB_CONFIG pointing at the ConfigMap's file (here a copy)."""
    env: dict[str, str] = {}
    for name, entry in container_env().items():
        if "value" in entry:
            env[name] = entry["value"]
        elif entry["valueFrom"]["secretKeyRef"]["key"] == "admin-token":
            env[name] = token
        elif not entry["valueFrom"]["secretKeyRef"].get("optional"):
            env[name] = "from-a-secret"
    env["GOL7LB_CONFIG"] = str(config_path)
    return env


def cpu_quantity(text: str | int) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def seconds(text: str) -> float:
    """A Kubernetes or Compose duration such as 45s, 1m30s."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, text
    h, m, s = (int(g or 0) for g in parts.groups())
    return h * 3600 + m * 60 + s


# -- schemas ---------------------------------------------------------------------------------

def test_every_expected_manifest_is_there() -> None:
    kinds = sorted(doc["kind"] for path, doc in all_objects() if path.parent == K8S)
    assert kinds == sorted(["ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler"])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        assert kubernetes_validate.validate(doc, version, strict=True) == \
            kubernetes_validate.utils.major_minor(version)


def test_the_validator_is_real() -> None:
    """A misspelt field, a wrong type and an unknown kind are refused, so a pass means
    something."""
    good = deployment()
    typo = yaml.safe_load(yaml.safe_dump(good))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = yaml.safe_load(yaml.safe_dump(good))
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Nothing"},
                                     KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_and_the_image() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = sorted(kustomization["resources"])
    assert listed == sorted(p.name for p in manifest_files() if p.parent == K8S)
    image = container()["image"].partition(":")[0]
    assert [i["name"] for i in kustomization["images"]] == [image]


# -- the Deployment --------------------------------------------------------------------------

def test_probes_use_admin_healthz_on_the_port_the_configmap_binds(tmp_path: Path) -> None:
    settings = load_settings_from_configmap("t", tmp_path / "lb.toml")
    admin_port = named_port("admin")
    assert settings.admin.address is not None and settings.admin.address[1] == admin_port
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container()[kind]
        assert probe["httpGet"]["path"] == "/healthz", kind
        assert probe["httpGet"]["port"] in ("admin", admin_port), kind
    # Liveness must not kill a pod whose helper is being restarted: it tolerates longer.
    live, ready = container()["livenessProbe"], container()["readinessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > \
        ready["periodSeconds"] * ready["failureThreshold"]


def test_http_port_is_the_images_port() -> None:
    assert named_port("http") == int(env_vars()["PORT"])
    assert "PORT" not in container_env() or container_env()["PORT"]["value"] == "8080"


def test_grace_period_covers_prestop_and_gunicorns_graceful_timeout() -> None:
    pre_stop = container()["lifecycle"]["preStop"]
    delay = pre_stop["sleep"]["seconds"]
    assert 5 <= delay <= 30, "long enough for endpoint removal to spread, not more"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    # preStop counts against the grace period; TERM comes after it, then up to
    # graceful_timeout of draining, then the helpers stop: leave a margin for them.
    assert grace >= delay + graceful_timeout() + 10, (grace, delay, graceful_timeout())


def test_runs_as_the_images_non_root_user() -> None:
    pod_security = pod_spec()["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == int(dockerfile_user()) != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    security = container()["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod_spec()["automountServiceAccountToken"] is False


def test_read_only_root_filesystem_with_an_empty_dir_on_tmp() -> None:
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # Nothing else may point the LB's temp directory at the read-only root.
    env = container_env()
    assert not {"TMPDIR", "XDG_RUNTIME_DIR"} & set(env)


def test_config_map_mounted_as_a_directory_at_gol7lb_config() -> None:
    config_path = Path(container_env()["GOL7LB_CONFIG"]["value"])
    mount = next(m for m in container()["volumeMounts"] if m["mountPath"] == str(
        config_path.parent))
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    assert mount["readOnly"] is True
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert config_path.name in one("ConfigMap")["data"]


def test_resources_requested_and_limited() -> None:
    resources = container()["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"], key
    request, limit = (cpu_quantity(resources[k]["cpu"]) for k in ("requests", "limits"))
    assert 0 < request <= limit
    # The worker count follows the CPU limit (gol7lb/cpus.py): keep it whole, so no worker
    # is throttled by a fraction of a CPU.
    assert limit == int(limit) and "WEB_CONCURRENCY" not in container_env()


def test_admin_token_comes_from_a_secret_and_never_from_a_file() -> None:
    entry = container_env()["GOL7LB_ADMIN_TOKEN"]
    assert "value" not in entry
    ref = entry["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and not ref.get("optional")
    assert not re.search(r"^\s*token\s*=", config_toml(), re.M), "no token in the ConfigMap"
    sticky = container_env()["GOL7LB_STICKY_SECRET"]["valueFrom"]["secretKeyRef"]
    assert sticky["name"] == ref["name"]


def test_service_links_are_off_because_the_lb_refuses_unknown_variables() -> None:
    """Kubernetes would export <SERVICE>_SERVICE_HOST and <SERVICE>_PORT for every Service of
    the namespace; for the one named gol7lb that is GOL7LB_SERVICE_HOST, which the LB's
    settings refuse. So the pod turns them off."""
    assert pod_spec()["enableServiceLinks"] is False
    name = one("Service")["metadata"]["name"].upper().replace("-", "_")
    links = {f"{name}_SERVICE_HOST": "10.0.0.10", f"{name}_PORT": "tcp://10.0.0.10:80"}
    with pytest.raises(ConfigError, match="unknown environment variable"):
        load_settings(links)


def test_rolling_update_never_drops_below_the_current_count() -> None:
    strategy = deployment()["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment()["spec"], "the autoscaler owns the count"


# -- the ConfigMap ---------------------------------------------------------------------------

def load_settings_from_configmap(token: str | None, path: Path) -> Any:
    """The LB's own settings parser on the ConfigMap's file, with the pod's environment."""
    path.write_text(config_toml())
    env = pod_env(path, token or "")
    if token is None:
        env.pop("GOL7LB_ADMIN_TOKEN", None)
    return load_settings(env)


def test_configmap_toml_validates_with_the_pods_environment(tmp_path: Path) -> None:
    settings = load_settings_from_configmap("a-token", tmp_path / "lb.toml")
    assert not settings.demo_backends
    assert settings.admin.token == "a-token"
    host = settings.admin.address[0]
    assert host in ("0.0.0.0", "::"), "probes arrive on the pod IP: bind beyond loopback"
    assert settings.cpu_affinity == "off"


def test_configmap_alone_refuses_to_start_without_the_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"admin\.token"):
        load_settings_from_configmap(None, tmp_path / "lb.toml")


def test_the_pod_starts_probes_answer_and_mutations_need_the_token(tmp_path: Path) -> None:
    """The container as the kubelet starts it: the Deployment's environment, the ConfigMap's
    file, the admin listener on every address (a free port, not 8404: other LBs may run
    here), the temp directory an empty directory of its own. The probes' request answers
    200 ok; the backends follow the headless Service's DNS records as it scales; the API
    refuses a drain without the token and accepts it with the token."""
    token = secrets.token_hex(16)
    config = tmp_path / "lb.toml"
    config.write_text(config_toml())
    emptydir = tmp_path / "tmp"
    emptydir.mkdir()
    admin_port = free_port()
    env = pod_env(config, token)
    # Cluster DNS: a real DNS server whose records for the headless name change as the
    # StatefulSet scales (the pods need not exist: /status lists what was discovered).
    spec = load_settings_from_configmap(token, tmp_path / "again.toml").pools["default"]
    name, port = spec.discover[0].name, spec.discover[0].port
    dns = TestDNS(tmp_path)
    dns.set_a(name, ["127.0.0.21", "127.0.0.22"])
    env.update(GOL7LB_ADMIN_BIND=f"0.0.0.0:{admin_port}", TMPDIR=str(emptydir),
               GOL7LB_DISCOVERY_RESOLVERS=dns.address)
    env.pop("XDG_RUNTIME_DIR", None)
    lb = LB(env, tmp_path / "lb.log")
    try:
        lb.wait_ready(timeout=60)
        answer = requests.get(f"{lb.admin_url}/healthz", timeout=5)
        assert (answer.status_code, answer.text.strip()) == (200, "ok")
        assert [p.name for p in emptydir.iterdir() if p.name.startswith("gol7lb-")], \
            "the private run directory is made in the temp directory"

        def discovered() -> set[str]:
            return {b["id"] for b in lb_status(lb)["backends"]}

        wait_until(lambda: discovered() == {f"127.0.0.21:{port}", f"127.0.0.22:{port}"})
        dns.set_a(name, ["127.0.0.21", "127.0.0.22", "127.0.0.23"])  # scaled up
        wait_until(lambda: len(discovered()) == 3)
        dns.set_a(name, ["127.0.0.22", "127.0.0.23"])  # and down
        wait_until(lambda: discovered() == {f"127.0.0.22:{port}", f"127.0.0.23:{port}"})
        drain = f"{lb.admin_url}/backends/127.0.0.22:{port}/drain"
        assert requests.post(drain, timeout=5).status_code == 401
        answer = requests.post(drain, timeout=5, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
    finally:
        assert lb.stop() == 0, lb.output()
        dns.stop()
    assert not lb.leftovers()
    assert not [p for p in emptydir.iterdir() if p.name.startswith("gol7lb-")], \
        "the run directory is removed at exit"


READ_ONLY_POD = r"""
set -e
mount --bind -o ro "$APP_DIR" "$APP_MOUNT"         # the image's /app (the checkout may
cd "$APP_MOUNT"                                    # live under /tmp, hidden below)
mount --bind -o ro "$CONFIG_DIR" "$CONFIG_MOUNT"    # the ConfigMap's volume
mount -o remount,bind,ro /                         # readOnlyRootFilesystem
mount -t tmpfs -o size=64m,mode=1777 tmpfs "$STAGE" # the emptyDir for /tmp, built aside so
IFS=:                                              # that what Python needs from below the
for dir in $KEEP_UNDER_TMP; do                     # old /tmp (a venv, say) is bound into it
  mkdir -p "$STAGE/$dir" && mount --bind -o ro "/tmp/$dir" "$STAGE/$dir"
done
unset IFS
mount --no-mtab --move "$STAGE" /tmp               # then it covers /tmp
if touch /.gol7lb-write-probe 2>/dev/null; then echo "root still writable" >&2; exit 97; fi
exec "$PYTHON" -m gunicorn -c gunicorn.conf.py gol7lb.wsgi --no-control-socket
"""


def python_dirs_under_tmp() -> list[str]:
    """The directories below /tmp this interpreter runs from (a venv, its site-packages, an
    editable checkout), relative to /tmp and outermost only: the pod's empty /tmp would hide
    them, so the pod keeps them visible (read-only) under it."""
    import os
    import sys

    tmp = Path("/tmp")
    found: set[Path] = set()
    for path in (sys.prefix, sys.exec_prefix, sys.base_prefix,
                 os.path.dirname(sys.executable), *sys.path):
        for candidate in {Path(os.path.abspath(path or ".")), Path(path or ".").resolve()}:
            if candidate != tmp and candidate.is_relative_to(tmp) and candidate.is_dir():
                found.add(candidate.relative_to(tmp))
    outermost = [p for p in found if not any(p != q and p.is_relative_to(q) for q in found)]
    return sorted(str(p) for p in outermost)


def test_python_dirs_under_tmp_are_the_outermost_ones(monkeypatch, tmp_path: Path) -> None:
    import sys

    venv = tmp_path / "venv"
    (venv / "lib" / "site-packages").mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "path", [str(venv / "lib" / "site-packages"), "/usr/lib",
                                      str(tmp_path / "missing")])
    assert str(venv.relative_to("/tmp")) in python_dirs_under_tmp()
    assert not [d for d in python_dirs_under_tmp() if d.startswith(str(venv.relative_to("/tmp"))
                                                                   + "/")]


def test_the_pod_runs_with_a_read_only_root_filesystem(tmp_path: Path) -> None:
    """readOnlyRootFilesystem for real: in a mount namespace of its own the whole root is
    remounted read-only, /tmp is an empty tmpfs and the ConfigMap's file a read-only bind,
    as the kubelet lays them out (a Python environment that lives under /tmp, as a venv made
    there, stays visible in it read-only, as the image's /usr/local would be). The LB
    starts, answers the probes' /healthz, and stops on TERM with status 0, without one
    write refused."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    empty = [d for d in ("/srv", "/media", "/mnt") if os.path.isdir(d)
             and not os.listdir(d) and not os.path.ismount(d)]
    if len(empty) < 2:
        pytest.skip("needs two empty directories of /srv, /media, /mnt: one for the "
                    "ConfigMap's file, one for the checkout (which may live under /tmp)")
    mount_point, app_mount = empty[:2]
    probe = subprocess.run([unshare, "-m", "--propagation", "private", "true"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not allowed here: {probe.stderr.decode().strip()}")

    config_dir = tmp_path / "config"
    config_dir.mkdir()
    stage = tmp_path / "pod-tmp"  # made before the root turns read-only
    stage.mkdir()
    (config_dir / "lb.toml").write_text(config_toml())
    token = secrets.token_hex(16)
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GOL7LB_") and k not in ("TMPDIR", "XDG_RUNTIME_DIR")}
    env.update(pod_env(Path(mount_point) / "lb.toml", token))
    env.update(PORT=str(port), GOL7LB_ADMIN_BIND=f"0.0.0.0:{admin_port}",
               WEB_CONCURRENCY="2", PYTHONDONTWRITEBYTECODE="1", CONFIG_DIR=str(config_dir),
               CONFIG_MOUNT=mount_point, APP_DIR=str(ROOT), APP_MOUNT=app_mount,
               PYTHON=sys.executable, STAGE=str(stage),
               KEEP_UNDER_TMP=":".join(python_dirs_under_tmp()))
    log = tmp_path / "pod.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([unshare, "-m", "--propagation", "private", "bash", "-c",
                                 READ_ONLY_POD], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # As the startup probe does: ask until 200 (503 while the helpers come up).
        deadline = time.monotonic() + 60
        answer = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = requests.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=2)
                if answer.status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # the helpers still start
                pass
            time.sleep(0.1)
        assert answer is not None, log.read_text()
        assert (answer.status_code, answer.text.strip()) == (200, "ok"), log.read_text()
        status = requests.get(f"http://127.0.0.1:{admin_port}/status", timeout=5).json()
        assert status["config"]["last_error"] is None
        assert list(status["pools"]) == ["default"]
        # The proxy port answers too (503: the example's name does not resolve here).
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 503
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 5, "manager, supervisor, admin listener, discovery, workers"
        proc.terminate()
        assert proc.wait(timeout=60) == 0, log.read_text()
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    text = log.read_text()
    assert "Read-only file system" not in text and "Traceback" not in text, text
    assert "helpers stopped" in text, text


# -- Service, PodDisruptionBudget, HorizontalPodAutoscaler -----------------------------------

def test_deployment_selects_its_own_pods() -> None:
    spec = deployment()["spec"]
    assert spec["selector"]["matchLabels"] == LABELS
    assert LABELS.items() <= spec["template"]["metadata"]["labels"].items()


def test_service_sends_to_the_pods_http_port_and_hides_admin() -> None:
    service = one("Service")
    assert service["spec"]["selector"] == deployment()["spec"]["selector"]["matchLabels"]
    targets = [p["targetPort"] for p in service["spec"]["ports"]]
    assert targets == ["http"]
    assert named_port("http") != named_port("admin")
    # Client addresses survive to X-Forwarded-For only without SNAT.
    assert service["spec"].get("externalTrafficPolicy") == "Local"


def test_pdb_covers_the_deployments_pods_and_leaves_one_serving() -> None:
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == \
        deployment()["spec"]["selector"]["matchLabels"]
    hpa = one("HorizontalPodAutoscaler")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    assert "minAvailable" not in pdb["spec"]


def test_hpa_scales_the_deployment_on_its_cpu_request() -> None:
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == \
        (deployment()["apiVersion"], "Deployment", deployment()["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    metrics = hpa["spec"]["metrics"]
    assert [m["resource"]["name"] for m in metrics] == ["cpu"]
    assert "cpu" in container()["resources"]["requests"], "utilization is of the request"
    assert hpa["metadata"]["labels"] == deployment()["metadata"]["labels"]


# -- the example backends (headless Service) -------------------------------------------------

EXAMPLE = K8S / "examples" / "backend-headless-service.yaml"


def test_example_headless_service_matches_its_statefulset_and_the_configmap(
        tmp_path: Path) -> None:
    """The ConfigMap discovers the example's headless Service through DNS (so scaling the
    StatefulSet is followed), by its full name on the Service's port, and lists no pod."""
    service = one("Service", EXAMPLE)
    sts = one("StatefulSet", EXAMPLE)
    assert service["spec"]["clusterIP"] == "None", "headless: one DNS record per pod"
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    port = service["spec"]["ports"][0]["port"]
    namespace = service["metadata"].get("namespace", "default")
    settings = load_settings_from_configmap("t", tmp_path / "lb.toml")
    assert settings.backends == () and list(settings.pools) == ["default"]
    assert [(d.kind, d.name, d.port) for d in settings.pools["default"].discover] == [
        ("dns", f"{service['metadata']['name']}.{namespace}.svc.cluster.local", port)]
    command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "backend"] and command[3] == str(port)


def test_deployment_docs_kubernetes_section_describes_the_shipped_discovery() -> None:
    docs = (ROOT / "docs" / "deployment.md").read_text()
    section = docs[docs.index("\n## Kubernetes\n"):]
    end = section.find("\n## ", 1)  # the next section, or the end of the page
    section = section if end < 0 else section[:end]
    assert 'discover = "dns"' in section and "not in this version" not in section
