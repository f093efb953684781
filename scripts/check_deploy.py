"""Offline checks of the Helm chart (deploy/helm/idsync); run by scripts/check-deploy.

Renders the chart with several value sets (helm-python-sdk: Helm v4 as a
library, no cluster, no network), then for every rendered object:
  - built-in kinds: strict validation against the Kubernetes JSON schemas of
    kubernetes-validate (unknown fields are errors), for each KUBE_VERSIONS;
  - CRDs (KEDA ScaledObject, ServiceMonitor): deploy/helm/schemas/*.json, our
    own schemas of the fields the chart uses (no upstream schema is bundled);
  - the platform properties (non-root, limits, probes, no secret values,
    one detector per source, never two autoscalers on one Deployment, KEDA
    consumer names equal to crates/bus's);
  - the idsync.toml in each ConfigMap: TOML that parses, and
    `idsync config check` when an idsync binary is given (IDSYNC_BIN).
Value sets that must be refused are rendered too, and must fail.

Prints one line per check and `deploy: N passed, M failed`; exits 1 on a failure.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import helm_python as helm
import jsonschema
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parent.parent
# IDSYNC_CHART: another copy of the chart (one with charts/nats from
# `helm dependency update`, for example).
CHART = Path(os.environ.get("IDSYNC_CHART") or ROOT / "deploy" / "helm" / "idsync")
CRD_SCHEMAS = ROOT / "deploy" / "helm" / "schemas"
NAMES_RS = ROOT / "crates" / "bus" / "src" / "names.rs"
# The chart's kubeVersion floor and a recent release.
KUBE_VERSIONS = ["1.27.0", "1.33.0"]
NAMESPACE = "idsync"
RELEASE = "idsync"

EXTERNAL_NATS = {"nats": {"enabled": False, "url": "nats://nats.messaging.svc:4222"}}

# name -> (values, must render). The NATS subchart is not in charts/ here
# (no network); Helm renders without it, and these sets check our templates.
VALUE_SETS: dict[str, tuple[dict, bool]] = {
    "defaults": ({}, True),
    "embedded-idm": (
        {**EXTERNAL_NATS, "idm": {"store": "embedded", "persistence": {"size": "20Gi", "storageClassName": "fast"}}},
        True,
    ),
    "postgres-idm-3": (
        {"idm": {"store": "postgres", "replicas": 3, "postgres": {"existingSecret": "idsync-postgres", "key": "url"}}},
        True,
    ),
    "keda": ({"autoscaling": {"keda": {"enabled": True}}}, True),
    "hpa": ({"autoscaling": {"hpa": {"enabled": True}}}, True),
    "external-nats": (
        {
            **EXTERNAL_NATS,
            "autoscaling": {"keda": {"enabled": True, "natsServerMonitoringEndpoint": "nats.messaging.svc:8222"}},
        },
        True,
    ),
    "everything-on": (
        {
            "detector": {"instances": [{"name": "hr", "resources": ["hr"]}]},
            "metrics": {"podAnnotations": True, "serviceMonitor": {"enabled": True}},
            "networkPolicy": {
                "enabled": True,
                "idmClients": [{"podSelector": {"matchLabels": {"app": "idsync-admin"}}}],
                "monitoring": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            },
            "image": {"digest": "sha256:" + "0" * 64},
            "reconcile": {"jobs": [{"resource": "acme", "schedule": "0 3 * * *", "rate": 200}]},
        },
        True,
    ),
    # Refused on purpose:
    "refused: keda and hpa": ({"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}, False),
    "refused: grace not above drain": ({"terminationGracePeriodSeconds": 20, "shutdownGraceSeconds": 20}, False),
    "refused: external nats without url": ({"nats": {"enabled": False}}, False),
    "refused: a source in two detectors": (
        {"detector": {"instances": [{"name": "a", "resources": ["hr"]}, {"name": "b", "resources": ["hr"]}]}},
        False,
    ),
    "refused: a live source in no detector": (
        {"detector": {"instances": [{"name": "a", "resources": ["acme"]}]}},
        False,
    ),
    "refused: unknown store": ({"idm": {"store": "sqlite"}}, False),
    "refused: postgres without secret": ({"idm": {"store": "postgres"}}, False),
    "refused: reconcile of an unknown resource": ({"reconcile": {"jobs": [{"resource": "nope", "schedule": "@daily"}]}}, False),
    "refused: a typo in values": ({"idm": {"replica": 3}}, False),
    "refused: detector replicas": ({"detector": {"replicas": 2}}, False),
    "refused: a secret value in values": ({"secrets": {"admin": {"value": "x"}}}, False),
}

CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com-v1.json",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
# Pods that run to completion: no probes, no health listener.
BATCH = {"Job", "CronJob"}
# Patterns of secret values that must never appear in rendered output.
SECRET_PATTERNS = [
    re.compile(r"idsync1\.[A-Za-z0-9_-]{8,}"),  # sync token
    re.compile(r"idsync-admin\.[A-Za-z0-9_-]{8,}"),  # administrator credential
    re.compile(r"postgres(?:ql)?://[^\s/:@]+:[^\s/@]+@"),  # URL with a password
]
SECRET_KEYS = re.compile(r"(password|token|secret|postgres_url)$", re.I)


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def ok(self, name: str, problems: list[str]) -> None:
        if problems:
            self.failed += 1
            print(f"FAIL {name}")
            for p in problems:
                print(f"     - {p}")
        else:
            self.passed += 1
            print(f"ok   {name}")


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# ------------------------------------------------------------- validation

_validators: dict[tuple[str, str, str], jsonschema.protocols.Validator] = {}
_defs: dict[str, Resource] = {}


def builtin_validator(obj: dict, version: str):
    """A strict validator of obj's kind for Kubernetes `version`, cached."""
    wanted = kv.major_minor(version)
    have = [v for v in kv.all_versions() if tuple(map(int, kv.major_minor(v).split("."))) <= tuple(map(int, wanted.split(".")))]
    if not have:
        raise SystemExit(f"kubernetes-validate has no schemas for {version}")
    schema_dir = f"v{have[-1]}-local-strict"
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
    key = (schema_dir, obj["kind"], api)
    if key not in _validators:
        try:
            schema = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/{obj['kind'].lower()}-{api}.json", version)
        except FileNotFoundError:
            return None
        if schema_dir not in _defs:
            _defs[schema_dir] = Resource.from_contents(
                kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
            )
        registry = Resource.from_contents(schema) @ (_defs[schema_dir] @ Registry())
        _validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return _validators[key]


def crd_validator(obj: dict):
    name = CRDS.get((obj["apiVersion"], obj["kind"]))
    if name is None:
        return None
    key = ("crd", obj["apiVersion"], obj["kind"])
    if key not in _validators:
        schema = json.loads((CRD_SCHEMAS / name).read_text())
        _validators[key] = jsonschema.Draft202012Validator(schema)
    return _validators[key]


def schema_problems(obj: dict) -> list[str]:
    problems = []
    if not isinstance(obj.get("apiVersion"), str) or not isinstance(obj.get("kind"), str):
        return ["no apiVersion/kind"]
    v = crd_validator(obj)
    if v is not None:
        validators = [("crd schema", v)]
    else:
        validators = []
        for version in KUBE_VERSIONS:
            b = builtin_validator(obj, version)
            if b is None:
                return [f"no schema for {obj['apiVersion']} {obj['kind']} (Kubernetes {version}) and no CRD schema"]
            validators.append((f"Kubernetes {version}", b))
    for label, validator in validators:
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in e.path) or "(root)"
            problems.append(f"{label}: {path}: {e.message[:300]}")
    return problems


# ------------------------------------------------------------- properties


def pod_template(obj: dict) -> dict | None:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    if obj["kind"] in WORKLOADS:
        return obj["spec"]["template"]
    return None


def pod_spec(obj: dict) -> dict | None:
    t = pod_template(obj)
    return None if t is None else t["spec"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def container_problems(obj: dict) -> list[str]:
    spec = pod_spec(obj)
    if spec is None:
        return []
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    problems = []
    pod_sc = spec.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True:
        problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: the service account token is mounted (idsync never calls the API)")
    for c in spec.get("initContainers", []) + spec["containers"]:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            problems.append(f"{cw}: not runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser", 0)) == 0:
            problems.append(f"{cw}: runs as uid 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cw}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{cw}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{cw}: privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            problems.append(f"{cw}: capabilities are not drop [ALL] with nothing added")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp != "RuntimeDefault":
            problems.append(f"{cw}: seccompProfile is {seccomp!r}, not RuntimeDefault")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    problems.append(f"{cw}: no {kind}.{r}")
        env = env_of(c)
        for e in c.get("env", []):
            if SECRET_KEYS.search(e["name"]) and "value" in e:
                problems.append(f"{cw}: env {e['name']} has a literal value; secrets come from Secrets")
        if obj["kind"] in BATCH:
            if "livenessProbe" in c or "readinessProbe" in c:
                problems.append(f"{cw}: a run-to-completion pod has probes")
            continue
        bind = env.get("IDSYNC_HEALTH_BIND") or ""
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if not bind or ports.get("health") is None or not bind.endswith(f":{ports['health']}"):
            problems.append(f"{cw}: IDSYNC_HEALTH_BIND {bind!r} is not the `health` port {ports.get('health')}")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") not in ("health", ports.get("health")):
                problems.append(f"{cw}: {probe} is not GET {path} on the health port")
        grace = env.get("IDSYNC_SHUTDOWN_GRACE_SECONDS")
        tgp = spec.get("terminationGracePeriodSeconds", 30)
        if grace is None or not int(grace) < int(tgp):
            problems.append(f"{cw}: terminationGracePeriodSeconds {tgp} is not above IDSYNC_SHUTDOWN_GRACE_SECONDS {grace}")
        if not env.get("IDSYNC_CONFIG"):
            problems.append(f"{cw}: no IDSYNC_CONFIG")
    return problems


def bus_names() -> dict[str, str]:
    text = NAMES_RS.read_text()
    consts = dict(re.findall(r'pub const ([A-Z_]+): &str = "([^"]+)";', text))
    m = re.search(r'fn applier_durable\(agreement: &str\) -> String \{\s*format!\("([^"]*)\{agreement\}"\)', text)
    if not m:
        raise SystemExit(f"{NAMES_RS}: applier_durable's format changed; update scripts/check_deploy.py")
    consts["APPLIER_PREFIX"] = m.group(1)
    return consts


def release_problems(objs: list[dict], text: str, values: dict) -> list[str]:
    problems = []
    names = bus_names()
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    if "Secret" in by_kind:
        problems.append(f"the chart renders Secrets ({', '.join(by_kind['Secret'])}); it must only name existing ones")
    for pat in SECRET_PATTERNS:
        for m in pat.finditer(text):
            problems.append(f"a secret value in the output: {m.group(0)[:20]}…")
    # Detectors: one pod each, Recreate; the IDM on the embedded store: one.
    detectors = [d for d in by_kind.get("Deployment", {}).values()
                 if d["metadata"]["labels"].get("app.kubernetes.io/component") == "detector"]
    if not detectors:
        problems.append("no detector Deployment")
    for d in detectors:
        if d["spec"].get("replicas") != 1:
            problems.append(f"detector {d['metadata']['name']}: replicas {d['spec'].get('replicas')}, not 1")
        if d["spec"].get("strategy", {}).get("type") != "Recreate":
            problems.append(f"detector {d['metadata']['name']}: strategy is not Recreate")
    store = values.get("idm", {}).get("store", "embedded")
    idm_sts = [s for s in by_kind.get("StatefulSet", {}).values() if s["metadata"]["name"].endswith("-idm")]
    idm_dep = [s for s in by_kind.get("Deployment", {}).values() if s["metadata"]["name"].endswith("-idm")]
    if store == "embedded":
        if len(idm_sts) != 1 or idm_dep or idm_sts[0]["spec"].get("replicas") != 1 or not idm_sts[0]["spec"].get("volumeClaimTemplates"):
            problems.append("embedded store: the IDM is not one StatefulSet of 1 replica with a volume claim")
    else:
        want = values["idm"].get("replicas", 2)
        if len(idm_dep) != 1 or idm_sts or idm_dep[0]["spec"].get("replicas") != want:
            problems.append(f"postgres store: the IDM is not one Deployment of {want} replicas")
    # Autoscalers: targets exist, are workers, one autoscaler each.
    targets: dict[str, list[str]] = {}
    for kind, field in (("HorizontalPodAutoscaler", "scaleTargetRef"), ("ScaledObject", "scaleTargetRef")):
        for o in by_kind.get(kind, {}).values():
            ref = o["spec"][field]
            targets.setdefault(ref["name"], []).append(f"{kind}/{o['metadata']['name']}")
            dep = by_kind.get(ref.get("kind", "Deployment"), {}).get(ref["name"])
            if dep is None:
                problems.append(f"{kind}/{o['metadata']['name']}: target {ref['name']} is not rendered")
                continue
            component = dep["metadata"]["labels"].get("app.kubernetes.io/component")
            if component not in ("correlator", "applier", "provisioner"):
                problems.append(f"{kind}/{o['metadata']['name']} scales {component}; only the workers scale")
            if "replicas" in dep["spec"]:
                problems.append(f"{ref['name']}: autoscaled but the Deployment sets replicas (an upgrade would reset them)")
    for target, scalers in targets.items():
        if len(scalers) > 1:
            problems.append(f"{target} has several autoscalers: {', '.join(scalers)}")
    # KEDA triggers name the consumers crates/bus declares.
    agreements = sorted((values.get("config") or {}).get("agreements", {}))
    expected = {
        "correlator": {(names["CHANGES_STREAM"], names["CORRELATOR"])},
        "applier": {(names["DECISIONS_STREAM"], names["APPLIER_PREFIX"] + a) for a in agreements},
        "provisioner": {(names["FOCUS_STREAM"], names["PROVISIONER"])},
    }
    for so in by_kind.get("ScaledObject", {}).values():
        component = so["metadata"]["labels"].get("app.kubernetes.io/component")
        got = {(t["metadata"]["stream"], t["metadata"]["consumer"]) for t in so["spec"]["triggers"]}
        if got != expected.get(component):
            problems.append(f"ScaledObject/{so['metadata']['name']}: consumers {sorted(got)}, crates/bus says {sorted(expected.get(component, []))}")
    # Selectors of Services and budgets find pods.
    pods = [pod_template(o)["metadata"].get("labels", {}) for o in objs if o["kind"] in WORKLOADS]
    for kind in ("Service", "PodDisruptionBudget"):
        for o in by_kind.get(kind, {}).values():
            sel = o["spec"].get("selector", {})
            sel = sel.get("matchLabels", sel) if kind == "PodDisruptionBudget" else sel
            if sel and not any(all(p.get(k) == v for k, v in sel.items()) for p in pods):
                problems.append(f"{kind}/{o['metadata']['name']}: selector {sel} matches no pod")
    for o in by_kind.get("PodDisruptionBudget", {}).values():
        sel = o["spec"]["selector"]["matchLabels"]
        for w in objs:
            if w["kind"] in WORKLOADS and all(pod_template(w)["metadata"]["labels"].get(k) == v for k, v in sel.items()):
                if w["kind"] in BATCH or w["spec"].get("replicas", 2) == 1:
                    problems.append(f"PodDisruptionBudget/{o['metadata']['name']} covers singleton {w['metadata']['name']}")
    # Every ConfigMap and Secret a pod mounts: rendered, or named in values.
    for w in objs:
        spec = pod_spec(w)
        if spec is None:
            continue
        for vol in spec.get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
                problems.append(f"{w['metadata']['name']}: ConfigMap {vol['configMap']['name']} is not rendered")
            if "secret" in vol and vol["secret"]["secretName"] not in json.dumps(values) + json.dumps(DEFAULTS):
                problems.append(f"{w['metadata']['name']}: Secret {vol['secret']['secretName']} is named nowhere in values")
    return problems


def keys_of(value) -> list[str]:
    """Every key in a parsed TOML document, nested."""
    if isinstance(value, dict):
        return [k for k, v in value.items() for k in [k, *keys_of(v)]]
    if isinstance(value, list):
        return [k for v in value for k in keys_of(v)]
    return []


def config_problems(objs: list[dict], idsync_bin: str | None, knows_postgres: bool) -> tuple[list[str], list[str]]:
    problems, notes = [], []
    for o in objs:
        if o["kind"] != "ConfigMap" or "idsync.toml" not in o.get("data", {}):
            continue
        text = o["data"]["idsync.toml"]
        name = o["metadata"]["name"]
        try:
            parsed = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            problems.append(f"{name}: idsync.toml is not TOML: {e}")
            continue
        secrets_inline = [k for k in keys_of(parsed) if SECRET_KEYS.search(k)]
        if secrets_inline:
            problems.append(f"{name}: idsync.toml holds secret fields {secrets_inline}")
        if idsync_bin is None:
            continue
        if parsed.get("idm", {}).get("store") == "postgres" and not knows_postgres:
            notes.append(f"{name}: `idsync config check` skipped: this idsync build has no idm.store (postgres)")
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(text)
        try:
            r = subprocess.run([idsync_bin, "config", "check", f.name], capture_output=True, text=True, timeout=60)
        finally:
            os.unlink(f.name)
        if r.returncode != 0:
            problems.append(f"{name}: idsync config check: {(r.stdout + r.stderr).strip()}")
    return problems, notes


DEFAULTS: dict = {}


def main() -> int:
    global DEFAULTS
    start = time.monotonic()
    checks = Checks()
    idsync_bin = os.environ.get("IDSYNC_BIN") or None
    knows_postgres = False
    if idsync_bin:
        schema = subprocess.run([idsync_bin, "config", "schema"], capture_output=True, text=True, timeout=60).stdout
        knows_postgres = "postgres_url_file" in schema
    only = sys.argv[1:]
    with helm.Chart.load(CHART) as chart:
        DEFAULTS = chart.values
        lint = helm.lint(str(CHART), None, strict=True, namespace=NAMESPACE)
        lint_problems = [f"{m.get('path')}: {m.get('error')}" for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
        lint_problems += lint.get("errors", []) or []
        # The NATS dependency is declared but not downloaded here (no network).
        lint_problems = [p for p in lint_problems if not p.rstrip().endswith("missing these dependencies: nats")]
        checks.ok("helm lint --strict", lint_problems)
        for name, (values, must_render) in VALUE_SETS.items():
            if only and name not in only:
                continue
            try:
                chart.validate_schema(values)
                rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            except helm.HelmError as e:
                if must_render:
                    checks.ok(f"{name}: renders", [str(e)])
                else:
                    checks.ok(f"{name}: refused ({str(e).splitlines()[-1][:160]})", [])
                continue
            if not must_render:
                checks.ok(f"{name}: refused", ["rendered, but must be refused"])
                continue
            docs, texts = [], []
            for path, manifest in sorted(rendered.items()):
                if path.endswith("NOTES.txt"):
                    continue
                texts.append((path, manifest))
                docs += [(path, doc) for doc in yaml.safe_load_all(manifest) if doc]
            problems = []
            for path, o in docs:
                problems += [f"{path}: {o.get('kind')}/{o.get('metadata', {}).get('name')}: {p}" for p in schema_problems(o)]
            kinds = sorted({o["kind"] for _, o in docs})
            sub = sum(1 for path, _ in docs if "/charts/" in path)
            checks.ok(f"{name}: {len(docs)} objects valid ({', '.join(kinds)})" + (f", {sub} of them the NATS subchart's" if sub else ""), problems)
            # The platform's rules are for idsync's own objects; the
            # subchart (when present) is only schema-checked.
            objs = [o for path, o in docs if "/charts/" not in path]
            text = "\n".join(t for path, t in texts if "/charts/" not in path)
            checks.ok(f"{name}: containers non-root, limits, probes, drain", [p for o in objs for p in container_problems(o)])
            merged = deep_merge(DEFAULTS, values)
            checks.ok(f"{name}: secrets, detectors, IDM, autoscalers, selectors", release_problems(objs, text, merged))
            cp, notes = config_problems(objs, idsync_bin, knows_postgres)
            for n in notes:
                print(f"note {n}")
            what = "parses" + (", idsync config check" if idsync_bin else " (no IDSYNC_BIN: idsync config check skipped)")
            checks.ok(f"{name}: idsync.toml {what}", cp)
    print(f"deploy: {checks.passed} passed, {checks.failed} failed ({time.monotonic() - start:.1f} s)")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
