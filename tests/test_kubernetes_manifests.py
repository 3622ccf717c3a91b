"""The Kubernetes base (deploy/kubernetes) and the Istio example (examples/istio), checked offline.

There is no cluster, no kustomize and no istioctl here, so this is their stand-in. The base is rendered
as ``kubectl apply -k`` would (the ``resources`` of kustomization.yaml, the ``namespace`` set on every
namespaced object; any other kustomize feature fails the test rather than be ignored) and every object is
validated against the Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships, strictly (an
unknown field is an error). Then what no schema sees: Services name container ports that exist, selectors
select the pods they mean, every mounted ConfigMap exists and holds the files pdp.toml names, the probes
name paths pdp serves — and the real ``pdp serve``, started with the Deployment's command line on the
ConfigMaps laid out as the kubelet lays them out, answers the probes, decides over the Service's gRPC port
and stops within the grace period. The Istio documents are checked against the fields Istio's API defines
(istio/api: ``mesh/v1alpha1/config.proto``, ``security/v1beta1/authorization_policy.proto``,
``networking/v1alpha3/envoy_filter.proto``, ``gateway.proto``, ``peer_authentication.proto``), and the
EnvoyFilter's patch against Envoy's own ``ExtAuthz`` message.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2 as ext_authz_pb2
import grpc
import httpx
import kubernetes_validate
import pytest
import yaml
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import json_format
from servers import JwksServer, free_port

from pdp.config import parse_config
from pdp.devpki import TokenIssuer, make_ca, make_client
from pdp.service.grpc_listener import GrpcListener

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "kubernetes"
ISTIO = ROOT / "examples" / "istio"
PDP = str(Path(sys.executable).parent / "pdp")

#: The oldest Kubernetes minor the base is written for, and the newest whose schemas the package ships.
VERSIONS = ["1.30", kubernetes_validate.latest_version()]
#: Kinds that live in no namespace (kustomize's namespace transformer leaves them alone).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                  "StorageClass", "PersistentVolume", "IngressClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}
#: The kustomization fields this renderer understands; anything else would be silently skipped.
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "resources"}


# -- rendering
def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d is not None]


def render(folder: Path) -> list[dict[str, Any]]:
    """What ``kubectl apply -k folder`` sends: the resources in order, each with the kustomization's namespace."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text("utf-8"))
    unknown = set(kustomization) - KUSTOMIZE_FIELDS
    assert not unknown, f"{folder}/kustomization.yaml uses {unknown}: teach render() what they do"
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (folder / entry).resolve()
        docs += render(path) if path.is_dir() else _documents(path)
    namespace = kustomization.get("namespace")
    if namespace:
        for doc in docs:
            if doc["kind"] == "Namespace":
                doc["metadata"]["name"] = namespace  # as kustomize's namespace transformer does
            elif doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = namespace
    return docs


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


#: The kinds that run pods from a template: pdp's Deployment, Redis's StatefulSet.
WORKLOADS = ("Deployment", "StatefulSet")


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def container(deployment: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if name is None or c["name"] == name)


def container_port(deployment: dict[str, Any], port: str | int) -> int:
    """A Service targetPort or probe port (a name or a number) as the number a container listens on."""
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports", []):
            if port in (p.get("name"), p["containerPort"]):
                return int(p["containerPort"])
    raise AssertionError(f"{deployment['metadata']['name']} has no container port {port!r}")


def pdp_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(one(docs, "ConfigMap", "pdp-config")["data"]["pdp.toml"])


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


# -- the base, document by document
def test_the_kustomization_lists_every_manifest_in_its_folder() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_every_object_lives_in_the_namespace_the_base_creates(base: list[dict[str, Any]]) -> None:
    (namespace,) = of_kind(base, "Namespace")
    for doc in base:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], doc["metadata"]["name"]
    # Every pod of the base meets the Pod Security Standard the namespace enforces (checked below).
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(base: list[dict[str, Any]], version: str) -> None:
    for doc in base:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {exc.message}")


def test_a_misspelt_field_fails_schema_validation(base: list[dict[str, Any]]) -> None:
    """The strict schemas refuse unknown fields, so the validation above can fail."""
    deployment = json.loads(json.dumps(one(base, "Deployment", "pdp")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_two_hardened_replicas_of_the_dockerfile_image(base: list[dict[str, Any]]) -> None:
    deployment = one(base, "Deployment", "pdp")
    assert deployment["spec"]["replicas"] == 2
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    pdp = container(deployment, "pdp")
    assert pdp["image"] == f"pdp:{version}"  # `docker build -t pdp:VERSION .`, as the README says
    dockerfile = (ROOT / "Dockerfile").read_text()
    user, group = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M).groups()  # type: ignore[union-attr]
    pod = deployment["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(user), int(group))
    assert {d["kind"] for d in workloads(base)} == set(WORKLOADS)
    for d in workloads(base):
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}


def test_the_listeners_match_the_container_ports(base: list[dict[str, Any]]) -> None:
    deployment = one(base, "Deployment", "pdp")
    server = pdp_toml(base)["server"]
    # Outside the pod only an address on every interface can be reached.
    assert server["http"].startswith("0.0.0.0:") and server["grpc"].startswith("0.0.0.0:")
    assert container_port(deployment, "http") == port_of(server["http"])
    assert container_port(deployment, "grpc") == port_of(server["grpc"])
    assert "tls" not in server, "the kubelet's httpGet probes cannot present a client certificate"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"EXPOSE {port_of(server['http'])} {port_of(server['grpc'])}" in dockerfile


def test_the_probes_name_pdps_health_routes_on_its_http_port(base: list[dict[str, Any]]) -> None:
    deployment = one(base, "Deployment", "pdp")
    pdp = container(deployment, "pdp")
    assert pdp["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pdp["readinessProbe"]["httpGet"]["path"] == "/readyz"
    http = port_of(pdp_toml(base)["server"]["http"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container_port(deployment, pdp[probe]["httpGet"]["port"]) == http, probe


def test_every_service_names_container_ports_of_the_pods_it_selects(base: list[dict[str, Any]]) -> None:
    deployments = workloads(base)
    for service in of_kind(base, "Service"):
        targets = [d for d in deployments if selects(service["spec"]["selector"], pod_labels(d))]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        for port in service["spec"]["ports"]:
            container_port(targets[0], port["targetPort"])
            assert port.get("appProtocol"), f"{service['metadata']['name']}:{port['name']} has no appProtocol"
    pdp = one(base, "Service", "pdp")
    protocols = {p["appProtocol"]: container_port(one(base, "Deployment", "pdp"), p["targetPort"])
                 for p in pdp["spec"]["ports"]}
    server = pdp_toml(base)["server"]
    assert protocols == {"grpc": port_of(server["grpc"]), "http": port_of(server["http"])}


def test_deployment_selectors_pdb_and_hpa_target_the_pdp_pods(base: list[dict[str, Any]]) -> None:
    for d in workloads(base):
        assert selects(d["spec"]["selector"]["matchLabels"], pod_labels(d)), d["metadata"]["name"]
    deployment = one(base, "Deployment", "pdp")
    pdb = one(base, "PodDisruptionBudget", "pdp")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = one(base, "HorizontalPodAutoscaler", "pdp")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pdp"}
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # The HPA scales on a share of the request: without one there is nothing to take a share of.
    assert container(deployment, "pdp")["resources"]["requests"]["cpu"]


def test_every_mounted_configmap_and_secret_is_defined(base: list[dict[str, Any]]) -> None:
    for d in workloads(base):
        pod = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        # A StatefulSet's claims are volumes of its pods too (each pod gets its own PersistentVolumeClaim).
        claims = {c["metadata"]["name"]: c for c in d["spec"].get("volumeClaimTemplates", [])}
        assert not set(volumes) & set(claims), f"{d['metadata']['name']}: a volume and a claim of one name"
        volumes.update({name: {"name": name, "persistentVolumeClaim": claim} for name, claim in claims.items()})
        for c in pod["containers"]:
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{d['metadata']['name']} mounts an undeclared {mount['name']}"
                assert "subPath" not in mount, "a subPath mount never sees the ConfigMap change"
        for volume in volumes.values():
            if "configMap" in volume:
                one(base, "ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                one(base, "Secret", volume["secret"]["secretName"])
        if pod.get("serviceAccountName"):
            one(base, "ServiceAccount", pod["serviceAccountName"])


def mounts(base: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The pdp container's mount paths, each with the files its ConfigMap puts there."""
    deployment = one(base, "Deployment", "pdp")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    found: dict[str, dict[str, str]] = {}
    for mount in container(deployment, "pdp")["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            found[mount["mountPath"]] = one(base, "ConfigMap", volume["configMap"]["name"])["data"]
    return found


def absolute_paths(value: Any) -> Iterator[str]:
    if isinstance(value, str) and value.startswith("/"):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from absolute_paths(v)
    elif isinstance(value, list):
        for v in value:
            yield from absolute_paths(v)


def test_every_file_pdp_toml_names_is_in_a_mounted_configmap(base: list[dict[str, Any]]) -> None:
    mounted = mounts(base)
    command = container(one(base, "Deployment", "pdp"), "pdp")["command"]
    config_path = command[command.index("--config") + 1]
    paths = [config_path, *absolute_paths(pdp_toml(base))]
    assert len(paths) >= 4  # the config, the policy, its data, the trust bundle
    for path in paths:
        folder, _, name = path.rpartition("/")
        assert folder in mounted, f"{path} is in no mounted ConfigMap"
        assert name in mounted[folder], f"the ConfigMap mounted at {folder} holds no {name}"


def test_the_policy_configmap_is_the_shipped_policy(base: list[dict[str, Any]]) -> None:
    data = one(base, "ConfigMap", "pdp-policy")["data"]
    assert data["zero_trust.rego"] == (ROOT / "policies" / "zero_trust.rego").read_text("utf-8")
    assert set(json.loads(data["data.json"])["pdp"]["config"]) >= {"public_paths", "allowed_trust_domains", "routes"}
    # The policy's allowed trust domain is the trust bundle's.
    domains = json.loads(data["data.json"])["pdp"]["config"]["allowed_trust_domains"]
    assert [b["trust_domain"] for b in pdp_toml(base)["certificates"]["trust_bundles"]] == domains


def test_replicas_share_state_through_the_redis_service(base: list[dict[str, Any]]) -> None:
    url = urllib.parse.urlsplit(pdp_toml(base)["store"]["url"])
    assert url.scheme == "redis"
    service = one(base, "Service", url.hostname or "")  # a Service of pdp's own namespace
    assert service["metadata"]["namespace"] == one(base, "Deployment", "pdp")["metadata"]["namespace"]
    port = next(p for p in service["spec"]["ports"] if p["port"] == url.port)
    redis = one(base, "StatefulSet", "redis")
    assert selects(service["spec"]["selector"], pod_labels(redis))
    listening = container_port(redis, port["targetPort"])
    args = container(redis, "redis")["args"]
    assert args[0] == "redis-server" and int(args[args.index("--port") + 1] if "--port" in args else 6379) == listening
    # pdp's docs require a maxmemory with the noeviction policy (an evicted jti could be replayed).
    assert "noeviction" in (ROOT / "README.md").read_text()
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = args[args.index("--maxmemory") + 1]
    assert re.fullmatch(r"\d+mb", maxmemory)
    limit = container(redis, "redis")["resources"]["limits"]["memory"]
    assert int(maxmemory[:-2]) * 10**6 < int(limit.removesuffix("Mi")) * 2**20
    # No RDB snapshots besides the append-only file (checked below).
    assert "--save" in args and args[args.index("--save") + 1] == ""


def test_redis_keeps_the_store_on_a_persistent_volume_claim(base: list[dict[str, Any]]) -> None:
    """The revocation list lives in the store alone: Redis writes an append-only file into its dir, that
    dir is where the pod's PersistentVolumeClaim is mounted (not an emptyDir, not the image's read-only
    root), and the claim outlives the StatefulSet. One pod, named by the Service pdp reaches Redis by."""
    redis = one(base, "StatefulSet", "redis")
    args = container(redis, "redis")["args"]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "redis-server" and options["--appendonly"] == "yes"
    assert options.get("--appendfsync", "everysec") in ("everysec", "always")
    folder = options["--dir"]
    (mount,) = [m for m in container(redis, "redis")["volumeMounts"] if m["mountPath"] == folder]
    assert "subPath" not in mount and not mount.get("readOnly", False)
    (claim,) = [c for c in redis["spec"]["volumeClaimTemplates"] if c["metadata"]["name"] == mount["name"]]
    assert (claim["apiVersion"], claim["kind"]) == ("v1", "PersistentVolumeClaim")
    assert "ReadWriteOnce" in claim["spec"]["accessModes"]
    storage = claim["spec"]["resources"]["requests"]["storage"]
    assert re.fullmatch(r"\d+Gi", storage) and int(storage[:-2]) * 2**30 > 2 * int(options["--maxmemory"][:-2]) * 10**6
    assert not [v for v in redis["spec"]["template"]["spec"].get("volumes", []) if v["name"] == mount["name"]]
    assert redis["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert redis["spec"]["replicas"] == 1  # one Redis writes the file
    service = one(base, "Service", redis["spec"]["serviceName"])
    assert selects(service["spec"]["selector"], pod_labels(redis))
    # The pod's user can write the claim: the volume is given the pod's group.
    security = redis["spec"]["template"]["spec"]["securityContext"]
    assert security["fsGroup"] == security["runAsGroup"]
    assert "nothing needs to" not in (BASE / "redis.yaml").read_text()


def test_network_policies_admit_the_gateway_and_prometheus_and_let_pdp_reach_redis_dns_and_https(
        base: list[dict[str, Any]]) -> None:
    deployment = one(base, "Deployment", "pdp")
    server = pdp_toml(base)["server"]
    policy = one(base, "NetworkPolicy", "pdp")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(deployment))
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress = policy["spec"]["ingress"]
    assert all(rule.get("from") for rule in ingress), "a rule without 'from' admits everyone"
    gateway, prometheus = ingress
    assert {p["port"] for p in gateway["ports"]} == {port_of(server["grpc"]), port_of(server["http"])}
    assert port_of(server["http"]) in {p["port"] for p in prometheus["ports"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port_of(server["http"])
    redis = one(base, "StatefulSet", "redis")
    egress = policy["spec"]["egress"]
    to_redis = [r for r in egress if any(selects(t.get("podSelector", {}).get("matchLabels", {}), pod_labels(redis))
                                         and "namespaceSelector" not in t for t in r["to"])]
    assert [p["port"] for r in to_redis for p in r["ports"]] == [container_port(redis, "redis")]
    assert {(p["port"], p["protocol"]) for r in egress for p in r["ports"] if p["port"] == 53} == {(53, "UDP"),
                                                                                                  (53, "TCP")}
    jwks = [urllib.parse.urlsplit(i["jwks_url"]) for i in pdp_toml(base)["tokens"]["issuers"] if "jwks_url" in i]
    assert jwks and all(u.scheme == "https" and (u.port or 443) == 443 for u in jwks)
    assert any(p["port"] == 443 and any("ipBlock" in t for t in r["to"]) for r in egress for p in r["ports"])
    redis_policy = one(base, "NetworkPolicy", "redis")
    assert selects(redis_policy["spec"]["podSelector"]["matchLabels"], pod_labels(redis))
    (only,) = redis_policy["spec"]["ingress"]
    assert [selects(f["podSelector"]["matchLabels"], pod_labels(deployment)) for f in only["from"]] == [True]


def test_the_grace_period_covers_pdps_drain(base: list[dict[str, Any]]) -> None:
    deployment = one(base, "Deployment", "pdp")
    pod = deployment["spec"]["template"]["spec"]
    pause = int(container(deployment, "pdp")["lifecycle"]["preStop"]["exec"]["command"][1])
    grpc_grace = GrpcListener.stop.__defaults__[0]  # type: ignore[index]
    jwks = max(float(i.get("jwks_timeout", 3.0)) for i in pdp_toml(base)["tokens"]["issuers"])
    # preStop, then SIGTERM: gRPC's grace (and the wait after it), a JWKS fetch under way, with room to spare.
    assert pod["terminationGracePeriodSeconds"] >= pause + grpc_grace + 1 + jwks + 5


# -- the real pdp on the base's configuration
def dump_toml(data: dict[str, Any]) -> str:
    """TOML for the tables, arrays of tables, strings, numbers, booleans and string lists of a pdp.toml."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, list) and not any(isinstance(x, dict) for x in v):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r}")

    lines: list[str] = []

    def table(t: dict[str, Any], path: list[str]) -> None:
        for k, v in t.items():
            if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
                lines.append(f"{k} = {value(v)}")
        for k, v in t.items():
            if isinstance(v, dict):
                lines.append(f"[{'.'.join([*path, k])}]")
                table(v, [*path, k])
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"[[{'.'.join([*path, k])}]]")
                    table(item, [*path, k])

    table(data, [])
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text) == data
    return text


def lay_out_configmap(folder: Path, data: dict[str, str]) -> None:
    """A ConfigMap volume as the kubelet writes it: the files in a timestamped folder, ``..data`` linking to
    it, and a link per file through ``..data`` (so an update swaps one link)."""
    stamp = folder / "..2026_12_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for name, text in data.items():
        (stamp / name).write_text(text)
        (folder / name).symlink_to(Path("..data") / name)
    (folder / "..data").symlink_to(stamp.name)


def remap(value: Any, moves: dict[str, str]) -> Any:
    if isinstance(value, str):
        for mount, here in moves.items():
            if value.startswith(mount + "/"):
                return here + value[len(mount):]
        return value
    if isinstance(value, dict):
        return {k: remap(v, moves) for k, v in value.items()}
    if isinstance(value, list):
        return [remap(v, moves) for v in value]
    return value


@pytest.fixture
def deployed(tmp_path: Path, base: list[dict[str, Any]], prefix: str) -> Iterator[dict[str, Any]]:
    """``pdp serve`` run with the Deployment's command on the base's ConfigMaps, laid out as the kubelet
    would, on loopback ports. Adapted to this machine: the trust bundle holds a test CA whose client
    certificate the test presents, the issuer's JWKS URL is a loopback server with the test issuer's
    keys, and the store is the local Redis under this test's key prefix."""
    config = pdp_toml(base)
    issuer_url = config["tokens"]["issuers"][0]["issuer"]
    ca = make_ca("deployed test root")
    domain = config["certificates"]["trust_bundles"][0]["trust_domain"]
    client = make_client(ca, spiffe_id=f"spiffe://{domain}/demo/client")
    issuer = TokenIssuer.generate(issuer_url, kid="k8s")
    moves: dict[str, str] = {}
    for mount, data in mounts(base).items():
        here = tmp_path / mount.strip("/").replace("/", "-")
        if "ca.pem" in data:
            data = {**data, "ca.pem": ca.pem.decode()}
        lay_out_configmap(here, data)
        moves[mount] = str(here)
    config = remap(config, moves)
    with JwksServer() as jwks:
        jwks.jwks = issuer.jwks
        for i in config["tokens"]["issuers"]:
            i["jwks_url"] = f"{jwks.issuer}/jwks.json"
        config["store"] = {**config["store"], "url": "redis://127.0.0.1:6379/0", "prefix": prefix}
        # The Deployment mounts the config folder; this file replaces the one in it, same name, same place.
        command = list(container(one(base, "Deployment", "pdp"), "pdp")["command"])
        config_path = Path(remap(command[command.index("--config") + 1], moves))
        config_path.unlink()
        config_path.write_text(dump_toml(config))
        parse_config(tomllib.loads(config_path.read_text()), config_path.parent, config_path)
        http, grpc_port = free_port(), free_port()
        assert command[0] == "pdp"
        command[0] = PDP
        command[command.index("--config") + 1] = str(config_path)
        proc = subprocess.Popen([*command, "--http", f"127.0.0.1:{http}", "--grpc", f"127.0.0.1:{grpc_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            yield {"http": f"http://127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc_port}", "proc": proc,
                   "client": client, "issuer": issuer, "config": config}
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            if proc.stderr is not None:
                proc.stderr.close()


def wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"pdp exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered 200")


def envoy_check(token: str | None, certificate_pem: bytes | None) -> external_auth_pb2.CheckRequest:
    """A Check as Istio's gateway sends it with include_peer_certificate: the leaf, URL-encoded."""
    headers = {":authority": "api.example.org", ":method": "GET", ":path": "/orders"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1", method="GET", path="/orders", host="api.example.org", scheme="https", protocol="HTTP/2")
    http.headers.update(headers)
    source = attribute_context_pb2.AttributeContext.Peer()
    if certificate_pem is not None:
        source.certificate = urllib.parse.quote(certificate_pem.decode(), safe="")
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        source=source, request=attribute_context_pb2.AttributeContext.Request(http=http)))


@pytest.mark.integration
def test_pdp_serves_the_base_configuration_answers_the_probes_decides_and_drains(
        deployed: dict[str, Any], base: list[dict[str, Any]]) -> None:
    deployment = one(base, "Deployment", "pdp")
    pdp = container(deployment, "pdp")
    proc: subprocess.Popen[str] = deployed["proc"]
    wait_ready(deployed["http"] + pdp["readinessProbe"]["httpGet"]["path"], proc)
    assert httpx.get(deployed["http"] + pdp["livenessProbe"]["httpGet"]["path"], timeout=5).status_code == 200
    assert httpx.get(deployed["http"] + pdp["startupProbe"]["httpGet"]["path"], timeout=5).status_code == 200
    metrics = httpx.get(deployed["http"] + deployment["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/path"], timeout=5)
    assert metrics.status_code == 200 and "pdp_decisions_total" in metrics.text
    audience = deployed["config"]["tokens"]["issuers"][0]["audiences"][0]
    token = deployed["issuer"].mint(bound_to=deployed["client"], audience=audience, scope="read")
    with grpc.insecure_channel(deployed["grpc"]) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        allowed = stub.Check(envoy_check(token, deployed["client"].pem), timeout=30)
        assert allowed.status.code == grpc.StatusCode.OK.value[0], allowed.denied_response.body
        # Istio's filter as it is built without the EnvoyFilter of examples/istio sends no certificate:
        # the bound token is refused, and so is a request without one.
        denied = stub.Check(envoy_check(token, None), timeout=30)
        assert denied.status.code != grpc.StatusCode.OK.value[0]
        assert json.loads(denied.denied_response.body)["reason"] == "binding_cert_missing"
        denied = stub.Check(envoy_check(None, None), timeout=30)
        assert json.loads(denied.denied_response.body)["reason"] == "cert_required"
    # What the kubelet does after the preStop pause: SIGTERM, and SIGKILL when the rest of the grace is up.
    pause = int(pdp["lifecycle"]["preStop"]["exec"]["command"][1])
    left = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] - pause
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=left) in (0, -signal.SIGTERM)  # uvicorn ends by the signal once it has drained
    print(f"pdp stopped {time.monotonic() - started:.2f} s after SIGTERM (the grace period leaves {left} s)")


# -- Istio
#: The fields Istio's API defines for each document (istio/api protos, JSON names), nested by message.
MESH_GRPC_PROVIDER = {"service", "port", "timeout", "failOpen", "statusOnError", "includeRequestBodyInCheck"}
EXTENSION_PROVIDER_KINDS = {"envoyExtAuthzHttp", "envoyExtAuthzGrpc", "zipkin", "lightstep", "datadog", "stackdriver",
                            "opencensus", "skywalking", "opentelemetry", "prometheus", "envoyFileAccessLog",
                            "envoyHttpAls", "envoyTcpAls", "envoyOtelAls"}
AUTHZ_POLICY = {"selector", "targetRef", "targetRefs", "rules", "action", "provider"}
AUTHZ_ACTIONS = {"ALLOW", "DENY", "AUDIT", "CUSTOM"}
RULE = {"from", "to", "when"}
SOURCE = {"principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces", "notNamespaces",
          "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts"}
OPERATION = {"hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"}
ENVOY_FILTER = {"workloadSelector", "targetRefs", "configPatches", "priority"}
PATCH = {"applyTo", "match", "patch"}
APPLY_TO = {"INVALID", "LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER", "ROUTE_CONFIGURATION",
            "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER", "EXTENSION_CONFIG", "BOOTSTRAP", "LISTENER_FILTER"}
MATCH = {"context", "proxy", "listener", "routeConfiguration", "cluster"}
CONTEXTS = {"ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"}
LISTENER_MATCH = {"portNumber", "portName", "filterChain", "listenerFilter", "name"}
FILTER_CHAIN_MATCH = {"name", "sni", "transportProtocol", "applicationProtocols", "filter", "destinationPort"}
PATCH_BODY = {"operation", "value", "filterClass"}
OPERATIONS = {"INVALID", "MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "REPLACE"}
GATEWAY = {"servers", "selector"}
SERVER = {"port", "bind", "hosts", "tls", "defaultEndpoint", "name"}
SERVER_TLS = {"httpsRedirect", "mode", "serverCertificate", "privateKey", "caCertificates", "credentialName",
              "credentialNames", "subjectAltNames", "verifyCertificateSpki", "verifyCertificateHash",
              "minProtocolVersion", "maxProtocolVersion", "cipherSuites", "caCrl", "tlsCertificates"}
PEER_AUTHENTICATION = {"selector", "targetRef", "targetRefs", "mtls", "portLevelMtls"}


def known(doc: dict[str, Any], fields: set[str], where: str) -> None:
    unknown = set(doc) - fields
    assert not unknown, f"{where}: {sorted(unknown)} not in Istio's API ({sorted(fields)})"


@pytest.fixture(scope="module")
def istio() -> list[dict[str, Any]]:
    return render(ISTIO)


def test_the_istio_kustomization_lists_every_cluster_resource_of_the_example(istio: list[dict[str, Any]]) -> None:
    listed = set(yaml.safe_load((ISTIO / "kustomization.yaml").read_text())["resources"])
    # istio-install.yaml is istioctl's input, not a cluster object.
    assert listed == {p.name for p in ISTIO.glob("*.yaml")} - {"kustomization.yaml", "istio-install.yaml"}
    assert {d["kind"] for d in istio} == {"PeerAuthentication", "AuthorizationPolicy", "Gateway", "EnvoyFilter"}


def provider(base: list[dict[str, Any]]) -> dict[str, Any]:
    install = yaml.safe_load((ISTIO / "istio-install.yaml").read_text())
    assert (install["apiVersion"], install["kind"]) == ("install.istio.io/v1alpha1", "IstioOperator")
    providers = install["spec"]["meshConfig"]["extensionProviders"]
    for p in providers:
        known(p, {"name"} | EXTENSION_PROVIDER_KINDS, "extensionProviders[]")
        assert len(set(p) & EXTENSION_PROVIDER_KINDS) == 1
    (pdp,) = [p for p in providers if "envoyExtAuthzGrpc" in p]
    return dict(pdp)


def test_the_mesh_registers_pdps_grpc_service_as_an_ext_authz_provider(base: list[dict[str, Any]]) -> None:
    pdp = provider(base)
    grpc_provider = pdp["envoyExtAuthzGrpc"]
    known(grpc_provider, MESH_GRPC_PROVIDER, "envoyExtAuthzGrpc")
    service = one(base, "Service", "pdp")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert grpc_provider["service"] == f"{name}.{namespace}.svc.cluster.local"
    (port,) = [p for p in service["spec"]["ports"] if p["appProtocol"] == "grpc"]
    assert grpc_provider["port"] == port["port"]
    assert grpc_provider["failOpen"] is False
    assert re.fullmatch(r"\d+(\.\d+)?s", grpc_provider["timeout"])
    assert 400 <= int(grpc_provider["statusOnError"]) < 600


def test_the_custom_policy_names_the_provider(base: list[dict[str, Any]], istio: list[dict[str, Any]]) -> None:
    names = {provider(base)["name"]}
    custom = [d for d in of_kind(istio, "AuthorizationPolicy") if d["spec"].get("action") == "CUSTOM"]
    assert custom
    for policy in of_kind(istio, "AuthorizationPolicy"):
        assert policy["apiVersion"] in ("security.istio.io/v1", "security.istio.io/v1beta1")
        spec = policy["spec"]
        known(spec, AUTHZ_POLICY, "AuthorizationPolicy.spec")
        assert spec.get("action", "ALLOW") in AUTHZ_ACTIONS
        assert ("provider" in spec) == (spec.get("action") == "CUSTOM")
        known(spec["selector"], {"matchLabels"}, "selector")
        assert spec["rules"], "an ALLOW policy without rules matches nothing; a CUSTOM one never asks"
        for rule in spec["rules"]:
            known(rule, RULE, "rules[]")
            for f in rule.get("from", []):
                known(f, {"source"}, "from[]")
                known(f["source"], SOURCE, "source")
            for t in rule.get("to", []):
                known(t, {"operation"}, "to[]")
                known(t["operation"], OPERATION, "operation")
                assert all(isinstance(p, str) for p in t["operation"].get("ports", []))
    for policy in custom:
        known(policy["spec"]["provider"], {"name"}, "provider")
        assert policy["spec"]["provider"]["name"] in names


def test_only_the_gateway_may_ask_pdp_in_the_mesh(base: list[dict[str, Any]], istio: list[dict[str, Any]]) -> None:
    deployment = one(base, "Deployment", "pdp")
    namespace = deployment["metadata"]["namespace"]
    peer = one(istio, "PeerAuthentication", "pdp")
    known(peer["spec"], PEER_AUTHENTICATION, "PeerAuthentication.spec")
    assert peer["metadata"]["namespace"] == namespace and peer["spec"]["mtls"] == {"mode": "STRICT"}
    callers = one(istio, "AuthorizationPolicy", "pdp-callers")
    assert callers["metadata"]["namespace"] == namespace
    assert selects(callers["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    (rule,) = callers["spec"]["rules"]
    assert [int(p) for t in rule["to"] for p in t["operation"]["ports"]] == [container_port(deployment, "grpc")]
    principals = [p for f in rule["from"] for p in f["source"]["principals"]]
    assert principals and all(re.fullmatch(r"[^/]+/ns/[^/]+/sa/[^/]+", p) for p in principals)
    # The CUSTOM policy's workloads are the ones admitted here and by the NetworkPolicy.
    custom = one(istio, "AuthorizationPolicy", "pdp-ext-authz")
    gateway_rule = one(base, "NetworkPolicy", "pdp")["spec"]["ingress"][0]["from"][0]
    assert gateway_rule["podSelector"]["matchLabels"] == custom["spec"]["selector"]["matchLabels"]
    assert gateway_rule["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": custom["metadata"]["namespace"]}
    assert all(f"/ns/{custom['metadata']['namespace']}/" in p for p in principals)


def test_the_envoy_filter_turns_on_the_peer_certificate_for_the_gateway(istio: list[dict[str, Any]]) -> None:
    envoy_filter = one(istio, "EnvoyFilter", "pdp-peer-certificate")
    assert envoy_filter["apiVersion"] == "networking.istio.io/v1alpha3"
    spec = envoy_filter["spec"]
    known(spec, ENVOY_FILTER, "EnvoyFilter.spec")
    custom = one(istio, "AuthorizationPolicy", "pdp-ext-authz")
    assert envoy_filter["metadata"]["namespace"] == custom["metadata"]["namespace"]
    assert spec["workloadSelector"] == {"labels": custom["spec"]["selector"]["matchLabels"]}
    (patch,) = spec["configPatches"]
    known(patch, PATCH, "configPatches[]")
    assert patch["applyTo"] in APPLY_TO and patch["applyTo"] == "HTTP_FILTER"
    known(patch["match"], MATCH, "match")
    assert patch["match"]["context"] in CONTEXTS
    known(patch["match"]["listener"], LISTENER_MATCH, "listener")
    chain = patch["match"]["listener"]["filterChain"]
    known(chain, FILTER_CHAIN_MATCH, "filterChain")
    # The names Envoy registers the connection manager and the ext_authz filter under (Istio's own).
    assert chain["filter"] == {"name": "envoy.filters.network.http_connection_manager",
                               "subFilter": {"name": "envoy.filters.http.ext_authz"}}
    known(patch["patch"], PATCH_BODY, "patch")
    assert patch["patch"]["operation"] in OPERATIONS and patch["patch"]["operation"] == "MERGE"
    typed = dict(patch["patch"]["value"]["typed_config"])
    assert typed.pop("@type") == "type.googleapis.com/" + ext_authz_pb2.ExtAuthz.DESCRIPTOR.full_name
    merged = json_format.ParseDict(typed, ext_authz_pb2.ExtAuthz())  # an unknown field raises
    assert merged.include_peer_certificate is True
    assert set(patch["patch"]["value"]) == {"typed_config"}


def test_the_gateway_asks_clients_for_a_certificate(istio: list[dict[str, Any]]) -> None:
    gateway = one(istio, "Gateway", "api")
    known(gateway["spec"], GATEWAY, "Gateway.spec")
    custom = one(istio, "AuthorizationPolicy", "pdp-ext-authz")
    assert gateway["spec"]["selector"] == custom["spec"]["selector"]["matchLabels"]
    for server in gateway["spec"]["servers"]:
        known(server, SERVER, "servers[]")
        known(server["port"], {"number", "protocol", "name", "targetPort"}, "port")
        known(server["tls"], SERVER_TLS, "tls")
        assert server["tls"]["mode"] == "MUTUAL" and server["tls"]["credentialName"]


def test_the_istio_example_explains_the_certificates_way_and_the_gateway_settings() -> None:
    text = (ISTIO / "README.md").read_text()
    for needed in ("include_peer_certificate", "x-forwarded-client-cert", "cert_header", "trusted_proxies",
                   "xfcc_element", "intermediates"):
        assert needed in text, needed
    readme = (ROOT / "README.md").read_text()
    assert "kubectl apply -k deploy/kubernetes" in readme and "examples/istio" in readme
