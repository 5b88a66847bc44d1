"""Checks of the Helm chart's rendered objects (helm/imagegen), with helm from helm/tools/install_helm.py.

No cluster is involved: each value set in helm/imagegen/ci/ is rendered with `helm template` and the objects are
checked against docs/services.md and against each other (GPU counts, torchrun world sizes, probe ports, Service
and NetworkPolicy selectors, routes, security settings). Schema validation of the objects themselves
(kubernetes-validate) is in helm/tools/check_chart.sh.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "imagegen"
VALUE_SETS = {p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))}
HELM_DIR = pathlib.Path(os.environ.get("IMAGEGEN_HELM_DIR", pathlib.Path.home() / ".cache" / "imagegen" / "helm"))
RELEASE = "rel"
NAMESPACE = "ns"

# docs/services.md
GRPC_PORTS = {"gateway": 50051, "encoder": 50052, "denoiser": 50053, "vae": 50054}
METRICS_PORTS = {"gateway": 9100, "encoder": 9101, "denoiser": 9102, "vae": 9103}
MODEL_STAGES = ("encoder", "denoiser", "vae")
COMPONENT = "app.kubernetes.io/component"
GPU = "nvidia.com/gpu"


# --- rendering ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary, installed (once, then cached) by the same helper CI uses."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "helm" / "tools" / "install_helm.py"), str(HELM_DIR)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"install_helm.py failed:\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


def _helm(helm: str, command: str, values: list[pathlib.Path], extra: list[str] = ()) -> subprocess.CompletedProcess:
    args = [helm, command]
    if command == "template":
        args += [RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", "1.33.0"]
    else:
        args += ["--strict", str(CHART)]
    for path in values:
        args += ["-f", str(path)]
    return subprocess.run([*args, *extra], capture_output=True, text=True, timeout=120)


def render(helm: str, *values: pathlib.Path) -> list[dict]:
    proc = _helm(helm, "template", list(values))
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: render(helm, path) for name, path in VALUE_SETS.items()}


def merged_values(name: str) -> dict:
    """The chart's values.yaml with a value set over it (Helm's rule: maps merge, everything else replaces)."""

    def overlay(dst: dict, src: dict) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                overlay(dst[key], value)
            else:
                dst[key] = copy.deepcopy(value)

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    overlay(values, yaml.safe_load(VALUE_SETS[name].read_text()) or {})
    return values


def expected_models(name: str) -> dict[str, dict]:
    """model id -> {sp, cfg, world, nodes, device, groups} as the value set asks for."""
    values = merged_values(name)
    out = {}
    for model in values["models"]:
        denoiser = {**values["stageDefaults"]["denoiser"], **model.get("denoiser", {})}
        sp = model.get("sp", 1)
        cfg = bool(model.get("cfgParallel", False))
        out[model["id"]] = {
            "sp": sp,
            "cfg": cfg,
            "world": sp * (2 if cfg else 1),
            "nodes": denoiser["nodesPerGroup"],
            "groups": denoiser["replicas"],
            "device": denoiser.get("device") or model.get("device", "cuda"),
        }
    return out


# --- object helpers -----------------------------------------------------------------------------------------------


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def pod_templates(objs: list[dict]) -> list[tuple[str, dict]]:
    """(owner name, pod template {metadata, spec}) of every workload, plus bare Pods (helm test)."""
    pods = [(w["metadata"]["name"], w["spec"]["template"]) for w in workloads(objs)]
    pods += [(p["metadata"]["name"], p) for p in of_kind(objs, "Pod")]
    return pods


def labels(pod: dict) -> dict:
    return pod["metadata"].get("labels", {})


def selects(selector: dict | None, pod_labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions); {} selects everything."""
    selector = selector or {}
    if any(pod_labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and pod_labels.get(key) not in vals:
            return False
        if op == "NotIn" and pod_labels.get(key) in vals:
            return False
        if op == "Exists" and key not in pod_labels:
            return False
        if op == "DoesNotExist" and key in pod_labels:
            return False
    return True


def main_container(pod: dict) -> dict:
    (container,) = pod["spec"]["containers"]
    return container


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def named_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def argv(container: dict) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def flag(args: list[str], name: str) -> str | None:
    """Value of `--name V` or `--name=V` in args."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def gpus(container: dict) -> tuple[int, int]:
    resources = container.get("resources", {})
    return resources.get("requests", {}).get(GPU, 0), resources.get("limits", {}).get(GPU, 0)


def denoiser_pods_by_model(objs: list[dict]) -> dict[str, list[tuple[dict, dict]]]:
    """model id -> [(workload, pod template)] of the denoiser workloads, the id read from --model-id."""
    out: dict[str, list] = {}
    for w in workloads(objs):
        pod = w["spec"]["template"]
        if labels(pod).get(COMPONENT) == "denoiser":
            out.setdefault(flag(argv(main_container(pod)), "--model-id"), []).append((w, pod))
    return out


# --- tests --------------------------------------------------------------------------------------------------------


def test_value_sets_cover_the_ci_matrix():
    assert {"defaults", "sp4-cfg", "external-redis", "cpu-tiny"} <= set(VALUE_SETS)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict_passes(helm, name):
    proc = _helm(helm, "lint", [VALUE_SETS[name]])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_denoiser_gpus_and_torchrun_world_size_equal_p_times_c(rendered, name):
    objs = rendered[name]
    expected = expected_models(name)
    found = denoiser_pods_by_model(objs)
    assert set(found) == set(expected)
    for model_id, want in expected.items():
        world, nodes = want["world"], want["nodes"]
        pods_in_groups = 0
        for workload, pod in found[model_id]:
            container = main_container(pod)
            args = argv(container)
            replicas = workload["spec"]["replicas"]
            pods_in_groups += replicas
            # Every rank runs the same contract command.
            serve = args[args.index("imagegen") :] if args[0] == "torchrun" else args
            assert serve[:3] == ["imagegen", "serve", "denoiser"], args
            assert flag(serve, "--sp") == str(want["sp"])
            assert ("--cfg-parallel" in serve) == want["cfg"]
            if world == 1:
                assert args[0] == "imagegen", "a group of one is not started through torchrun"
            else:
                assert args[0] == "torchrun"
                assert "--no-python" in args
                assert int(flag(args, "--nnodes")) == nodes
                assert int(flag(args, "--nproc-per-node")) * nodes == world
                if nodes == 1:
                    assert int(flag(args, "--nproc-per-node")) == world
            request, limit = gpus(container)
            if want["device"] == "cuda":
                assert request == limit == world // nodes, (model_id, container["resources"])
            else:
                assert request == limit == 0
        assert pods_in_groups == want["groups"] * nodes


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_encoder_and_vae_gpus_follow_their_device(rendered, name):
    values = merged_values(name)
    models = {m["id"]: m for m in values["models"]}
    for w in workloads(rendered[name]):
        pod = w["spec"]["template"]
        component = labels(pod).get(COMPONENT)
        if component not in ("encoder", "vae"):
            continue
        container = main_container(pod)
        model = models[flag(argv(container), "--model-id")]
        stage = {**values["stageDefaults"][component], **model.get(component, {})}
        device = stage.get("device") or model.get("device", "cuda")
        assert env(container)["IMAGEGEN_DEVICE"] == device
        want = stage["gpus"] if device == "cuda" else 0
        assert gpus(container) == (want, want), w["metadata"]["name"]
        tolerations = pod["spec"].get("tolerations", [])
        assert any(t.get("key") == GPU for t in tolerations) == (want > 0)


def test_sp4_cfg_group_is_one_pod_with_eight_gpus(rendered):
    (workload, pod), *_ = denoiser_pods_by_model(rendered["sp4-cfg"])["qwen-image"]
    container = main_container(pod)
    assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] == 2
    assert gpus(container) == (8, 8)
    assert container["command"] == ["torchrun"]
    assert container["args"][:3] == ["--nnodes=1", "--nproc-per-node=8", "--no-python"]
    assert container["args"][3:] == [
        "imagegen",
        "serve",
        "denoiser",
        "--model",
        "/models/Qwen-Image",
        "--model-id",
        "qwen-image",
        "--sp",
        "4",
        "--cfg-parallel",
    ]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts


def test_ulysses_degree_reaches_every_rank_and_counts_no_gpus(helm, tmp_path):
    """Z-Image (30 heads) on 8 GPUs: --sp 8 --ulysses 2 is 2 x 4 ring ranks; the GPUs are still P x C."""
    values = "models:\n  - {id: z, family: z-image, path: Z-Image, device: cuda, sp: 8, ulysses: 2}\n"
    (workload, pod), *_ = denoiser_pods_by_model(render(helm, _write(tmp_path, values)))["z"]
    container = main_container(pod)
    assert gpus(container) == (8, 8)
    assert container["args"][:3] == ["--nnodes=1", "--nproc-per-node=8", "--no-python"]
    serve = container["args"][3:]
    assert serve[serve.index("--sp") :] == ["--sp", "8", "--ulysses", "2"]


def test_model_defaults_reach_the_denoiser_as_flags(helm, tmp_path):
    """models[].defaults become the denoiser's --default-* flags (a guidance of 0 included); none: no flags."""
    values = (
        "models:\n  - {id: t, family: z-image, path: Z-Image-Turbo, device: cpu,"
        " defaults: {steps: 8, guidanceScale: 0, width: 768, height: 512, negativePrompt: 'low quality'}}\n"
        "  - {id: q, family: qwen-image, path: Qwen-Image, device: cpu}\n"
    )
    pods = denoiser_pods_by_model(render(helm, _write(tmp_path, values)))
    turbo, plain = (main_container(pods[m][0][1])["args"] for m in ("t", "q"))
    flags = {turbo[i]: turbo[i + 1] for i, arg in enumerate(turbo) if arg.startswith("--default-")}
    assert flags == {
        "--default-steps": "8",
        "--default-guidance-scale": "0",
        "--default-width": "768",
        "--default-height": "512",
        "--default-negative-prompt": "low quality",
    }
    assert not [arg for arg in plain if arg.startswith("--default-")]


def test_batching_settings_reach_the_denoiser(helm, tmp_path):
    """maxBatch 0 (the default) leaves the denoiser's own default; a model's denoiser block overrides both."""
    values = (
        "models:\n  - {id: a, family: z-image, path: A}\n"
        "  - {id: b, family: z-image, path: B, denoiser: {maxBatch: 4, batchWaitMs: 2.5}}\n"
    )
    pods = denoiser_pods_by_model(render(helm, _write(tmp_path, values)))
    default, tuned = (env(main_container(pods[m][0][1])) for m in ("a", "b"))
    assert "IMAGEGEN_MAX_BATCH" not in default and default["IMAGEGEN_BATCH_WAIT_MS"] == "10"
    assert tuned["IMAGEGEN_MAX_BATCH"] == "4" and tuned["IMAGEGEN_BATCH_WAIT_MS"] == "2.5"


def test_multinode_group_leader_and_workers(rendered):
    objs = rendered["multinode-tls"]
    groups = [w for w, _ in denoiser_pods_by_model(objs)["z-image"]]
    assert {w["kind"] for w in groups} == {"StatefulSet"}
    leaders = [w for w in groups if w["spec"]["template"]["metadata"]["labels"]["imagegen/role"] == "leader"]
    workers = [w for w in groups if w["spec"]["template"]["metadata"]["labels"]["imagegen/role"] == "worker"]
    assert len(leaders) == len(workers) == 2
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    for leader in leaders:
        name = leader["metadata"]["name"]
        worker = next(w for w in workers if w["metadata"]["name"] == name + "-w")
        assert leader["spec"]["replicas"] == 1 and worker["spec"]["ordinals"] == {"start": 1}
        rdzv = services[leader["spec"]["serviceName"]]
        assert rdzv["spec"]["clusterIP"] == "None" and rdzv["spec"]["publishNotReadyAddresses"] is True
        assert worker["spec"]["serviceName"] == rdzv["metadata"]["name"]
        for sts in (leader, worker):
            assert selects({"matchLabels": rdzv["spec"]["selector"]}, labels(sts["spec"]["template"]))
        master = f"{name}-0.{rdzv['metadata']['name']}.{NAMESPACE}.svc"
        leader_args = argv(main_container(leader["spec"]["template"]))
        worker_container = main_container(worker["spec"]["template"])
        worker_args = argv(worker_container)
        assert flag(leader_args, "--master-addr") == flag(worker_args, "--master-addr") == master
        assert flag(leader_args, "--node-rank") == "0"
        assert flag(worker_args, "--node-rank") == "$(NODE_RANK)"
        node_rank = next(e for e in worker_container["env"] if e["name"] == "NODE_RANK")
        assert node_rank["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
        # Workers serve nothing: no ports, no probes.
        assert "ports" not in worker_container and "livenessProbe" not in worker_container
    # The model's denoiser Service reaches the leaders only.
    svc = next(s for s in of_kind(objs, "Service") if s["metadata"]["name"].endswith("-z-image-denoiser"))
    selected = [w for w in groups if selects({"matchLabels": svc["spec"]["selector"]}, labels(w["spec"]["template"]))]
    assert selected == leaders


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_probes_and_ports_follow_the_contract(rendered, name):
    tls = merged_values(name)["tls"]["enabled"]
    probed = 0
    for owner, pod in pod_templates(rendered[name]):
        component = labels(pod).get(COMPONENT)
        for container in pod["spec"]["containers"]:
            ports = named_ports(container)
            variables = env(container)
            if component in GRPC_PORTS and "ports" in container:
                assert ports["grpc"] == GRPC_PORTS[component] == int(variables["IMAGEGEN_PORT"]), owner
                if "metrics" in ports:
                    assert ports["metrics"] == METRICS_PORTS[component] == int(variables["IMAGEGEN_METRICS_PORT"])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if component not in GRPC_PORTS:
                    continue
                if "ports" not in container:  # a multi-node worker rank
                    assert probe is None
                    continue
                assert probe is not None, (owner, kind)
                probed += 1
                assert probe.get("grpc", {}).get("service", "") == "", "probes check the server as a whole"
                if tls:  # the kubelet's gRPC probe has no TLS: the plaintext health port
                    assert probe["grpc"]["port"] == ports["health"] == int(variables["IMAGEGEN_HEALTH_PORT"])
                else:
                    assert probe["grpc"]["port"] == ports["grpc"], (owner, kind)
            if container.get("startupProbe", {}).get("grpc") and component != "gateway":
                probe = container["startupProbe"]
                assert probe["periodSeconds"] * probe["failureThreshold"] >= 600, "model loading needs time"
            # Named probe ports (Redis) exist.
            for kind in ("readinessProbe", "livenessProbe"):
                port = container.get(kind, {}).get("tcpSocket", {}).get("port")
                if isinstance(port, str):
                    assert port in ports, (owner, kind)
    assert probed > 0


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_stages_listen_on_the_pod_address_and_share_the_gateways_limits(rendered, name):
    """Stages bind 127.0.0.1 unless IMAGEGEN_HOST says otherwise; each checks requests against the same limits
    as the gateway."""
    values = merged_values(name)
    limits = {
        "IMAGEGEN_" + re.sub("([A-Z])", r"_\1", k).upper(): str(v)
        for k, v in values["gateway"]["requestLimits"].items()
    }
    stages = 0
    for owner, pod in pod_templates(rendered[name]):
        component = labels(pod).get(COMPONENT)
        if component not in GRPC_PORTS:
            continue
        variables = env(main_container(pod))
        assert {k: variables.get(k) for k in limits} == limits, owner
        if component in MODEL_STAGES:
            stages += 1
            assert variables["IMAGEGEN_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}, owner
    assert stages > 0


def assert_drain_sized(objs: list[dict], drain: int) -> None:
    """Every service drains for `drain` s; its pod outlives that (the kubelet kills it at
    terminationGracePeriodSeconds), and torchrun kills its ranks after rank 0 has drained, before the kubelet."""
    services = 0
    for owner, pod in pod_templates(objs):
        if labels(pod).get(COMPONENT) not in GRPC_PORTS:
            continue
        services += 1
        variables = env(main_container(pod))
        assert variables["IMAGEGEN_DRAIN_TIMEOUT"] == str(drain), owner
        kill_at = pod["spec"]["terminationGracePeriodSeconds"]
        assert kill_at > drain, owner
        if main_container(pod).get("command") == ["torchrun"]:
            assert drain < int(variables["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < kill_at, owner
    assert services > 0


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_pods_outlive_their_drain(rendered, name):
    assert_drain_sized(rendered[name], merged_values(name)["drainTimeoutSeconds"])


def test_termination_grace_follows_the_drain_timeout(helm):
    """A deeper queue, a longer drain: every pod's kill time moves with drainTimeoutSeconds."""
    proc = _helm(helm, "template", [VALUE_SETS["sp4-cfg"]], ["--set", "drainTimeoutSeconds=900"])
    assert proc.returncode == 0, proc.stderr
    assert_drain_sized([doc for doc in yaml.safe_load_all(proc.stdout) if doc], 900)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_services_select_pods_with_their_target_ports(rendered, name):
    objs = rendered[name]
    pods = pod_templates(objs)
    for svc in of_kind(objs, "Service"):
        selected = [(o, p) for o, p in pods if selects({"matchLabels": svc["spec"]["selector"]}, labels(p))]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for owner, pod in selected:
                container = main_container(pod)
                if isinstance(target, str):
                    assert target in named_ports(container), (svc["metadata"]["name"], owner)
                elif labels(pod).get("imagegen/role") != "worker":
                    assert target in named_ports(container).values() or port["name"] == "rendezvous"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_gateway_routes_point_at_each_models_services(rendered, name):
    objs = rendered[name]
    (gateway,) = [w for w in workloads(objs) if labels(w["spec"]["template"])[COMPONENT] == "gateway"]
    container = main_container(gateway["spec"]["template"])
    assert argv(container) == ["imagegen", "serve", "gateway"]
    routes = json.loads(env(container)["IMAGEGEN_ROUTES"])
    assert set(routes) == set(expected_models(name))
    assert env(container)["IMAGEGEN_DEFAULT_MODEL"] in routes
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    for model_id, route in routes.items():
        assert set(route) == set(MODEL_STAGES)
        for component, address in route.items():
            host, port = address.rsplit(":", 1)
            svc = services[host]
            assert int(port) == GRPC_PORTS[component] == svc["spec"]["ports"][0]["port"]
            selected = [
                p for _, p in pod_templates(objs) if selects({"matchLabels": svc["spec"]["selector"]}, labels(p))
            ]
            assert selected
            for pod in selected:
                container = main_container(pod)
                assert labels(pod)[COMPONENT] == component
                assert flag(argv(container), "--model-id") == model_id
                assert "grpc" in named_ports(container)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_network_policies_select_the_intended_pods(rendered, name):
    objs = rendered[name]
    pods = [(o, p) for o, p in pod_templates(objs) if labels(p).get(COMPONENT) != "test"]
    by_component: dict[str, set[str]] = {}
    for owner, pod in pods:
        by_component.setdefault(labels(pod)[COMPONENT], set()).add(owner)
    policies = of_kind(objs, "NetworkPolicy")
    assert policies

    def selected_by(selector: dict) -> set[str]:
        return {o for o, p in pods if selects(selector, labels(p))}

    def sources(rule: dict) -> set[str] | None:
        """Owners of the pods a rule admits; None: any source."""
        if "from" not in rule:
            return None
        admitted = set()
        for peer in rule["from"]:
            if "podSelector" in peer and "namespaceSelector" not in peer:
                admitted |= selected_by(peer["podSelector"])
            else:
                return None if not peer.get("namespaceSelector", {}).get("matchLabels") else admitted
        return admitted

    def rules_for_port(owner: str, port: int) -> list[dict]:
        return [
            rule
            for np in policies
            if owner in selected_by(np["spec"]["podSelector"])
            for rule in np["spec"].get("ingress", [])
            if "ports" not in rule or any(p["port"] == port for p in rule["ports"])
        ]

    # Selectors name this release, so that another release's pods in the namespace are neither chosen nor admitted.
    release = {"app.kubernetes.io/name": "imagegen", "app.kubernetes.io/instance": RELEASE}
    for np in policies:
        selectors = [np["spec"]["podSelector"]] + [
            peer["podSelector"]
            for rule in np["spec"].get("ingress", [])
            for peer in rule.get("from", [])
            if "podSelector" in peer and "namespaceSelector" not in peer
        ]
        for selector in selectors:
            assert release.items() <= selector.get("matchLabels", {}).items(), np["metadata"]["name"]
    # Each component's policy selects exactly that component's pods.
    for np in policies:
        component = np["metadata"]["labels"][COMPONENT]
        chosen = selected_by(np["spec"]["podSelector"])
        if np["metadata"]["name"].endswith("-denoiser-groups"):
            assert chosen and chosen <= by_component["denoiser"]
        else:
            assert chosen == by_component[component], np["metadata"]["name"]
    # Internal services: gRPC from the gateway only.
    gateway = by_component["gateway"]
    for component in MODEL_STAGES:
        for owner in by_component[component]:
            rules = rules_for_port(owner, GRPC_PORTS[component])
            assert rules, owner
            for rule in rules:
                admitted = sources(rule)
                assert admitted is not None, f"{owner}: gRPC open to everyone"
                assert admitted == gateway or admitted <= by_component["denoiser"], owner
            assert any(sources(rule) == gateway for rule in rules)
    # Redis: only the services that use the cache (encoder, denoiser).
    for owner in by_component.get("redis", ()):
        rules = rules_for_port(owner, 6379)
        assert rules
        for rule in rules:
            assert sources(rule) == by_component["encoder"] | by_component["denoiser"]
    # The gateway itself is reachable (by default from anywhere).
    for owner in gateway:
        assert rules_for_port(owner, GRPC_PORTS["gateway"])


def test_network_policy_peers_of_the_values_are_used(rendered):
    objs = rendered["multinode-tls"]
    (gw_policy,) = [np for np in of_kind(objs, "NetworkPolicy") if np["metadata"]["labels"][COMPONENT] == "gateway"]
    grpc_rule, metrics_rule = gw_policy["spec"]["ingress"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in grpc_rule["from"]
    assert metrics_rule["ports"] == [{"port": 9100, "protocol": "TCP"}]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


def test_external_redis_has_no_statefulset_and_passes_the_url(rendered):
    objs = rendered["external-redis"]
    values = merged_values("external-redis")["redis"]
    assert not [o for o in objs if o["metadata"].get("labels", {}).get(COMPONENT) == "redis"]
    users = 0
    for owner, pod in pod_templates(objs):
        component = labels(pod)[COMPONENT]
        variables = env(main_container(pod))
        if component in ("encoder", "denoiser"):
            users += 1
            assert variables["IMAGEGEN_REDIS_URL"] == values["external"]["url"]
            ref = variables["IMAGEGEN_REDIS_PASSWORD"]["secretKeyRef"]
            assert ref == {"name": values["auth"]["existingSecret"], "key": values["auth"]["existingSecretKey"]}
        else:
            assert "IMAGEGEN_REDIS_URL" not in variables, owner
    assert users >= 2


def test_internal_redis_is_a_statefulset_reached_through_its_service(rendered):
    objs = rendered["defaults"]
    (redis,) = [w for w in workloads(objs) if labels(w["spec"]["template"])[COMPONENT] == "redis"]
    assert redis["kind"] == "StatefulSet"
    container = main_container(redis["spec"]["template"])
    assert container["image"].split("/")[-1] == "redis:7"
    # The password is configuration on stdin, not an argument of redis-server (issue 20: /proc/1/cmdline).
    (script,) = container["args"]
    assert container["command"] == ["sh", "-c"] and "redis-server -" in script and "requirepass" in script
    assert "$REDIS_PASSWORD" in script and "$(REDIS_PASSWORD)" not in script
    secret_ref = env(container)["REDIS_PASSWORD"]["secretKeyRef"]
    assert secret_ref["name"] in {s["metadata"]["name"] for s in of_kind(objs, "Secret")}
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    for _, pod in pod_templates(objs):
        if labels(pod)[COMPONENT] in ("encoder", "denoiser"):
            variables = env(main_container(pod))
            host_port = variables["IMAGEGEN_REDIS_URL"].removeprefix("redis://").split("/")[0]
            host, port = host_port.split(":")
            assert services[host]["spec"]["ports"][0]["port"] == int(port) == 6379
            assert selects({"matchLabels": services[host]["spec"]["selector"]}, labels(redis["spec"]["template"]))
            assert variables["IMAGEGEN_REDIS_PASSWORD"]["secretKeyRef"] == secret_ref


def test_cpu_tiny_demo_requests_no_gpus_and_builds_its_checkpoint(rendered):
    objs = rendered["cpu-tiny"]
    assert "gpu" not in yaml.safe_dump(objs).lower().replace("gpus", "")
    for owner, pod in pod_templates(objs):
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            assert not [k for part in container.get("resources", {}).values() for k in part if "gpu" in k], owner
        if labels(pod).get(COMPONENT) not in MODEL_STAGES:
            continue
        container = main_container(pod)
        assert env(container)["IMAGEGEN_DEVICE"] == "cpu"
        (init,) = pod["spec"]["initContainers"]
        assert argv(init)[:2] == ["imagegen", "make-tiny"]
        assert flag(argv(init), "--family") == "qwen-image"
        assert flag(argv(init), "--out") == flag(argv(container), "--model")
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert "emptyDir" in volumes["weights"]
        assert not next(m for m in init["volumeMounts"] if m["name"] == "weights").get("readOnly")
        assert next(m for m in container["volumeMounts"] if m["name"] == "weights")["readOnly"] is True


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_pods_are_locked_down(rendered, name):
    objs = rendered[name]
    for sa in of_kind(objs, "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for owner, pod in pod_templates(objs):
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, owner
        assert spec["securityContext"]["runAsNonRoot"] is True, owner
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, owner
            assert ctx["allowPrivilegeEscalation"] is False, owner
            assert ctx["capabilities"]["drop"] == ["ALL"], owner
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], owner
        if labels(pod).get(COMPONENT) in MODEL_STAGES:
            weights = volumes["weights"]
            assert next(m for m in main_container(pod)["volumeMounts"] if m["name"] == "weights")["readOnly"]
            if "persistentVolumeClaim" in weights:
                assert weights["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_objects_carry_the_standard_labels_and_pdbs_select_pods(rendered, name):
    objs = rendered[name]
    for obj in objs:
        obj_labels = obj["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by", COMPONENT):
            assert key in obj_labels, (obj["kind"], obj["metadata"]["name"], key)
    pods = pod_templates(objs)
    pdbs = of_kind(objs, "PodDisruptionBudget")
    assert pdbs
    for pdb in pdbs:
        assert [o for o, p in pods if selects(pdb["spec"]["selector"], labels(p))], pdb["metadata"]["name"]


def test_tls_without_mtls_gives_the_ca_to_the_gateway_only(helm, tmp_path):
    objs = render(helm, VALUE_SETS["multinode-tls"], _write(tmp_path, "tls:\n  mtls: false\n"))
    for owner, pod in pod_templates(objs):
        component = labels(pod)[COMPONENT]
        if component in GRPC_PORTS:
            variables = env(main_container(pod))
            assert "IMAGEGEN_TLS_CERT" in variables, owner
            assert ("IMAGEGEN_TLS_CA" in variables) == (component == "gateway"), owner


def test_tls_and_api_keys_are_mounted_files(rendered):
    objs = rendered["multinode-tls"]
    for owner, pod in pod_templates(objs):
        if labels(pod)[COMPONENT] not in GRPC_PORTS:
            continue
        variables = env(main_container(pod))
        mounts = {m["name"]: m for m in main_container(pod)["volumeMounts"]}
        assert variables["IMAGEGEN_TLS_CERT"].startswith(mounts["tls"]["mountPath"]), owner
        assert variables["IMAGEGEN_TLS_CA"].startswith(mounts["tls"]["mountPath"]), owner
        if labels(pod)[COMPONENT] == "gateway":
            assert variables["IMAGEGEN_API_KEYS_FILE"].startswith(mounts["api-keys"]["mountPath"])
    (keys,) = [s for s in of_kind(objs, "Secret") if s["metadata"]["name"].endswith("-api-keys")]
    assert keys["data"]["api-keys"]


# --- the schema and the chart's own checks reject bad values -------------------------------------------------------


def _write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "values.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("gateway:\n  replcas: 3\n", "replcas"),
        ("models:\n  - id: m\n    family: qwen-image\n    path: M\n    cfgParalel: true\n", "cfgParalel"),
        ("stageDefaults:\n  denoiser:\n    nodesPerGrup: 2\n", "nodesPerGrup"),
        ("gateway:\n  replicas: two\n", "replicas"),
        ('models:\n  - id: m\n    family: qwen-image\n    path: M\n    sp: "4"\n', "sp"),
        ("models:\n  - id: m\n    family: flux\n    path: M\n", "family"),
        ("redis:\n  mode: sentinel\n", "mode"),
        ("stageDefaults:\n  denoiser:\n    maxBatch: -1\n", "maxBatch"),
        ("models:\n  - {id: m, family: z-image, path: M, defaults: {step: 8}}\n", "step"),
        ("models:\n  - {id: m, family: z-image, path: M, defaults: {width: 512}}\n", "height"),
    ],
    ids=[
        "typo-gateway",
        "typo-model",
        "typo-stage",
        "string-replicas",
        "string-sp",
        "bad-family",
        "bad-redis-mode",
        "negative-max-batch",
        "typo-default",
        "width-without-height",
    ],
)
def test_schema_rejects_bad_values(helm, tmp_path, values, message):
    path = _write(tmp_path, values)
    for command in ("lint", "template"):
        proc = _helm(helm, command, [path])
        assert proc.returncode != 0, f"helm {command} accepted:\n{values}"
        assert re.search(rf"\b{re.escape(message)}\b", proc.stdout + proc.stderr), proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("models:\n  - {id: a, family: qwen-image, path: A}\n  - {id: a, family: z-image, path: B}\n", "duplicate id"),
        (
            "models:\n  - {id: a, family: qwen-image, path: A, sp: 3, denoiser: {nodesPerGroup: 2}}\n",
            "does not divide",
        ),
        (
            "models:\n  - {id: a, family: qwen-image, path: A, encoder: {resources: {limits: {nvidia.com/gpu: 2}}}}\n",
            "derives",
        ),
        ("models:\n  - {id: a, family: z-image, path: A, sp: 8, ulysses: 3}\n", "ulysses 3 does not divide sp 8"),
        ("gateway:\n  defaultModel: nope\n", "defaultModel"),
        ("redis:\n  mode: external\n", "redis.external.url"),
        ("tls:\n  enabled: true\n", "tls.cert"),
    ],
    ids=[
        "duplicate-id",
        "nodes-not-dividing",
        "gpu-in-resources",
        "ulysses-not-dividing",
        "unknown-default-model",
        "no-url",
        "no-cert",
    ],
)
def test_chart_rejects_inconsistent_values(helm, tmp_path, values, message):
    proc = _helm(helm, "template", [_write(tmp_path, values)])
    assert proc.returncode != 0
    assert message in proc.stderr


def test_gateway_serves_the_openai_http_api_unless_disabled(helm, rendered, tmp_path):
    for name, objs in rendered.items():
        if merged_values(name)["gateway"]["http"]["enabled"] is not True:
            continue
        (gateway,) = [w for w in workloads(objs) if w["metadata"]["name"].endswith("-gateway")]
        container = main_container(gateway["spec"]["template"])
        assert named_ports(container)["http"] == 8000 == int(env(container)["IMAGEGEN_HTTP_PORT"]), name
        (service,) = [s for s in of_kind(objs, "Service") if s["metadata"]["name"].endswith("-gateway")]
        http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
        assert (http["targetPort"], http["appProtocol"]) == ("http", "http"), name
        policies = [np for np in of_kind(objs, "NetworkPolicy") if np["metadata"]["labels"][COMPONENT] == "gateway"]
        for policy in policies:  # the HTTP port admits the same peers as gRPC
            first = policy["spec"]["ingress"][0]
            assert {"port": 8000, "protocol": "TCP"} in first["ports"], name
    objs = render(helm, _write(tmp_path, "gateway:\n  http:\n    enabled: false\n"))
    (gateway,) = [w for w in workloads(objs) if w["metadata"]["name"].endswith("-gateway")]
    container = main_container(gateway["spec"]["template"])
    assert "http" not in named_ports(container) and env(container)["IMAGEGEN_HTTP_PORT"] == "0"
    (service,) = [s for s in of_kind(objs, "Service") if s["metadata"]["name"].endswith("-gateway")]
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]


# --- issue 20: closed by default --------------------------------------------------------------------------------


def _gateway_container(objs: list[dict]) -> dict:
    (gateway,) = [w for w in workloads(objs) if w["metadata"]["name"].endswith("-gateway")]
    return main_container(gateway["spec"]["template"])


def test_default_values_expose_no_gateway_without_keys(helm, rendered):
    """The defaults: no keys, so the gateway is a ClusterIP Service only; nothing is NodePort or LoadBalancer."""
    objs = rendered["defaults"]
    assert merged_values("defaults")["gateway"]["apiKeys"]["enabled"] is False
    assert {s["spec"].get("type", "ClusterIP") for s in of_kind(objs, "Service")} == {"ClusterIP"}
    variables = env(_gateway_container(objs))
    assert variables["IMAGEGEN_ALLOW_UNAUTHENTICATED"] == "1" and "IMAGEGEN_API_KEYS_FILE" not in variables


@pytest.mark.parametrize("kind", ["LoadBalancer", "NodePort"])
def test_chart_refuses_an_exposed_gateway_without_keys(helm, tmp_path, kind):
    proc = _helm(helm, "template", [_write(tmp_path, f"gateway:\n  service:\n    type: {kind}\n")])
    assert proc.returncode != 0 and "allowUnauthenticated" in proc.stderr
    allowed = f"gateway:\n  allowUnauthenticated: true\n  service:\n    type: {kind}\n"
    objs = render(helm, _write(tmp_path, allowed))
    assert env(_gateway_container(objs))["IMAGEGEN_ALLOW_UNAUTHENTICATED"] == "1"
    keyed = f"gateway:\n  apiKeys: {{enabled: true, keys: [k-0123456789abcdef]}}\n  service:\n    type: {kind}\n"
    variables = env(_gateway_container(render(helm, _write(tmp_path, keyed))))
    assert "IMAGEGEN_ALLOW_UNAUTHENTICATED" not in variables and variables["IMAGEGEN_API_KEYS_FILE"]


def test_every_pod_gets_the_internal_token_as_a_file_and_metrics_on_its_address(rendered):
    for name, objs in rendered.items():
        secrets = {s["metadata"]["name"]: s for s in of_kind(objs, "Secret")}
        (token,) = [s for s in secrets.values() if s["metadata"]["name"].endswith("-internal-token")]
        assert len(token["data"]["internal-token"]) >= 48, name
        for _, pod in pod_templates(objs):
            if labels(pod)[COMPONENT] not in ("gateway", "encoder", "denoiser", "vae"):
                continue
            container = main_container(pod)
            variables = env(container)
            path = variables["IMAGEGEN_INTERNAL_TOKEN_FILE"]
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert path.startswith(mounts["internal-token"]["mountPath"]), name
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            assert volumes["internal-token"]["secret"]["secretName"] == token["metadata"]["name"]
            assert variables["IMAGEGEN_METRICS_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
            assert "IMAGEGEN_ALLOW_UNAUTHENTICATED" not in variables or labels(pod)[COMPONENT] == "gateway"
            assert not any("token" in a or "password" in a.lower() for a in container.get("args", []))


def test_metrics_ports_are_closed_unless_peers_are_named(helm, rendered, tmp_path):
    def metrics_rules(objs):
        rules = []
        for policy in of_kind(objs, "NetworkPolicy"):
            for rule in policy["spec"].get("ingress", []):
                if any(p["port"] in METRICS_PORTS.values() for p in rule.get("ports", [])):
                    rules.append(rule)
        return rules

    assert metrics_rules(rendered["defaults"]) == []
    peers = "networkPolicy:\n  metricsFrom:\n    - namespaceSelector: {matchLabels: {name: monitoring}}\n"
    rules = metrics_rules(render(helm, _write(tmp_path, peers)))
    assert rules and all(rule["from"][0]["namespaceSelector"] for rule in rules)
    rules = metrics_rules(render(helm, _write(tmp_path, "networkPolicy:\n  metricsOpen: true\n")))
    assert rules and all("from" not in rule for rule in rules)
