"""What the manifests name exists in the code, read from the code itself (no copied lists):
ports, probe paths and probe modes, MIDIMATCH_* variables (and that the ConfigMap's values
parse as the settings), the other variables the manifests define (each one used), Secret keys,
metric names and label values in the alerts, the dashboard and the autoscaler's query, and the
Redis stream and consumer group KEDA reads."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest

from tests.k8s.conftest import K8S, ROOT, dockerfile_env, find, one, render

METRIC = re.compile(r"\bmidimatch_[a-z0-9_]+\b")
MATCHER = re.compile(r'\b(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


# ---------------------------------------------------------------- what the code has
def settings_classes():
    import server.settings
    import worker.settings

    for mod in (server.settings, worker.settings):
        for obj in vars(mod).values():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj)
                    and hasattr(obj, "from_env") and obj.__module__ == mod.__name__):
                yield obj


def setting_variables() -> set[str]:
    """Every MIDIMATCH_* variable the service reads: its settings' fields, the aliases and
    other names its settings modules spell out, and the cache location (model/env.py)."""
    names = {f"MIDIMATCH_{f.name.upper()}" for cls in settings_classes()
             for f in dataclasses.fields(cls)}
    for path in ("server/settings.py", "worker/settings.py", "model/env.py"):
        names |= set(re.findall(r'"(MIDIMATCH_[A-Z0-9_]+)"', (ROOT / path).read_text()))
    return names


def exported_metrics() -> tuple[set[str], dict[str, set[str]]]:
    """Sample names the gateway and the worker export, and every label's values."""
    from server.metrics import GatewayMetrics
    from worker.metrics import WorkerMetrics

    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for m in (GatewayMetrics(), WorkerMetrics()):
        for family in m.registry.collect():
            for s in family.samples:
                names.add(s.name)
                for k, v in s.labels.items():
                    labels.setdefault(k, set()).add(v)
    return names, labels


def gateway_routes() -> set[str]:
    text = (ROOT / "server/app.py").read_text()
    return set(re.findall(r'add_(?:get|static)\("([^"]+)"', text))


def code_keys(prefix: str):
    """The code's key-naming object for ``prefix``, and the consumer group's name."""
    try:
        import worker.redis_keys as mod
        cls = mod.RedisKeys
    except ImportError:  # before the key names had a module of their own
        import worker.redis_bus as mod
        cls = mod.RedisBus
    obj = cls.__new__(cls)
    obj.prefix = prefix
    return obj, mod.GROUP


# ---------------------------------------------------------------- what the manifests say
def containers(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            spec = d["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield d, c


def config(docs) -> dict[str, str]:
    return one(docs, "ConfigMap", "midimatch-config")["data"]


def all_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule, dashboard panel and Prometheus autoscaler query."""
    import yaml

    out = []
    rules = yaml.safe_load((K8S / "components/monitoring/prometheusrule.yaml").read_text())
    for g in rules["spec"]["groups"]:
        for r in g["rules"]:
            out.append((r.get("alert") or r.get("record"), r["expr"]))
    dash = json.loads((K8S / "components/monitoring/dashboard.json").read_text())
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((f"dashboard: {p['title']}", t["expr"]))
    for so in find(render("overlays/prod"), "ScaledObject"):
        for t in so["spec"]["triggers"]:
            if t["type"] == "prometheus":
                out.append((f"ScaledObject/{so['metadata']['name']}", t["metadata"]["query"]))
    return out


# ---------------------------------------------------------------- the checks
def test_every_midimatch_variable_is_a_setting(target):
    known = setting_variables()
    used = set()
    for _, c in containers(render(target)):
        used |= {e["name"] for e in c.get("env", []) if e["name"].startswith("MIDIMATCH_")}
    if target != "jobs/index-build":
        used |= {k for k in config(render(target)) if k.startswith("MIDIMATCH_")}
    for image in ("gateway.Dockerfile", "worker.Dockerfile"):
        used |= {k for k in dockerfile_env(image) if k.startswith("MIDIMATCH_")}
    assert used and not used - known, f"not read by the code: {sorted(used - known)}"


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_the_config_parses_as_the_settings(overlay):
    """Every settings class accepts the ConfigMap (with a Redis URL as the pods build it)."""
    env = dict(config(render(overlay)))
    env["MIDIMATCH_REDIS_URL"] = (f"{env['REDIS_SCHEME']}://:pw@{env['REDIS_ADDRESS']}/"
                                  f"{env['REDIS_DB']}")
    env["MIDIMATCH_WORKER_ID"] = "midimatch-worker-abc"
    for cls in settings_classes():
        cls.from_env(env)


def test_other_variables_are_each_used(target):
    """REDIS_*, INDEX_*...: defined for a reason (composed into the Redis URL, read by KEDA's
    addressFromEnv, by the index copy, by the Job's args)."""
    docs = render(target)
    defined = {e["name"] for _, c in containers(docs) for e in c.get("env", [])}
    if target != "jobs/index-build":
        defined |= set(config(docs))
    text = json.dumps(docs)
    for name in sorted(v for v in defined if not v.startswith("MIDIMATCH_")):
        if name == "REDISCLI_AUTH":
            continue  # redis-cli's own variable (the Redis readiness probe)
        refs = [f"$({name})", f"${name}", f'"{name}"']
        uses = sum(text.count(r) for r in refs)
        assert uses >= 2, f"k8s/{target}: {name} is defined but never used"


def test_secret_keys_exist():
    secret = one(render("overlays/dev"), "Secret", "midimatch-secrets")
    have = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for target in ("overlays/dev", "overlays/prod"):
        docs = render(target)
        refs = re.findall(r'"secretKeyRef": \{"key": "([^"]+)", "name": "midimatch-secrets"',
                          json.dumps(docs, sort_keys=True))
        for ta in find(docs, "TriggerAuthentication"):
            refs += [r["key"] for r in ta["spec"]["secretTargetRef"]]
        assert refs and set(refs) <= have, set(refs) - have


def test_ports_and_probe_paths_match_the_code():
    from server.settings import Settings
    from worker.settings import WorkerSettings

    routes = gateway_routes()
    for target in ("overlays/dev", "overlays/prod"):
        docs = render(target)
        cfg = config(docs)
        gw_port = Settings.from_env(cfg).port
        wk_port = WorkerSettings.from_env(cfg).metrics_port
        assert dockerfile_env("gateway.Dockerfile")["MIDIMATCH_PORT"] == str(gw_port)
        assert dockerfile_env("worker.Dockerfile")["MIDIMATCH_METRICS_PORT"] == str(wk_port)
        for d, c in containers(docs):
            name = d["metadata"]["name"]
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if c["name"] == "gateway":
                assert ports == {"http": gw_port}
            if c["name"] == "worker":
                assert ports == {"metrics": wk_port}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(probe)
                if not p:
                    continue
                if "httpGet" in p:
                    port = p["httpGet"]["port"]
                    assert port in ports or port in ports.values(), f"{name}: {probe} port"
                    path = p["httpGet"]["path"]
                    if c["name"] == "gateway":
                        assert path in routes, f"{name}: {probe} {path} is not a gateway route"
                    else:  # prometheus_client's server answers /metrics
                        assert path == "/metrics" and "start_http_server" in (
                            ROOT / "worker/cli.py").read_text()
                if "exec" in p and p["exec"]["command"][:2] == ["python", "/app/probe.py"]:
                    sys.path.insert(0, str(K8S / "images"))
                    try:
                        import probe
                    finally:
                        sys.path.pop(0)
                    assert p["exec"]["command"][2] in probe.CHECKS
        # Services and PodMonitors name ports that exist
        for svc in find(docs, "Service"):
            sel = svc["spec"]["selector"]["app.kubernetes.io/name"]
            dep = one(docs, "Deployment", sel)
            names = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                assert p["targetPort"] in names, f"Service/{svc['metadata']['name']}"
        for pm in find(docs, "PodMonitor"):
            dep = one(docs, "Deployment", pm["spec"]["selector"]["matchLabels"][
                "app.kubernetes.io/name"])
            names = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            for ep in pm["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in names and ep["path"] == "/metrics"
        # the in-cluster Redis is where the config says
        for svc in find(docs, "Service", "midimatch-redis"):
            assert cfg["REDIS_ADDRESS"] == f"midimatch-redis:{svc['spec']['ports'][0]['port']}"
        ingress_paths = {p["path"] for ing in find(docs, "Ingress")
                         for r in ing["spec"]["rules"] for p in r["http"]["paths"]}
        for path in ingress_paths:
            assert any(r == path or r.startswith(path) for r in routes), path


def test_metrics_in_alerts_dashboard_and_autoscaler_are_exported():
    names, labels = exported_metrics()
    exprs = all_exprs()
    assert len(exprs) > 10
    records = {w for w, _ in exprs if w.startswith("midimatch:")}
    for where, expr in exprs:
        used = set(METRIC.findall(expr))
        recorded = set(re.findall(r"\bmidimatch:[a-z0-9_:]+", expr)) - {where}
        assert recorded <= records, f"{where}: {sorted(recorded - records)} is not recorded"
        assert used or recorded, f"{where}: no midimatch metric in {expr!r}"
        missing = used - names
        assert not missing, f"{where}: {sorted(missing)} not exported by the code"
        for label, _, values in MATCHER.findall(expr):
            if label in labels:  # a label of midimatch's own (code, kind, stage)
                for v in values.split("|"):
                    assert v in labels[label], f"{where}: {label}={v!r} never exported"


def test_dashboard_json_is_what_its_generator_writes():
    import runpy

    gen = runpy.run_path(str(K8S / "components/monitoring/make_dashboard.py"))
    written = json.loads((K8S / "components/monitoring/dashboard.json").read_text())
    assert written == gen["dashboard"](), "run k8s/components/monitoring/make_dashboard.py"


def test_keda_reads_the_stream_and_group_the_workers_use():
    docs = render("overlays/prod")
    prefix = config(docs)["MIDIMATCH_REDIS_PREFIX"]
    keys, group = code_keys(prefix)
    so = one(docs, "ScaledObject", "midimatch-worker")
    triggers = [t for t in so["spec"]["triggers"] if t["type"] == "redis-streams"]
    assert triggers
    wk = one(docs, "Deployment", "midimatch-worker")
    env = {e["name"] for c in wk["spec"]["template"]["spec"]["containers"]
           for e in c.get("env", [])} | set(config(docs))
    for t in triggers:
        md = t["metadata"]
        assert md["stream"] == keys.sessions_key
        assert md.get("consumerGroup", group) == group
        assert md["addressFromEnv"] in env
    # the workers' ScaledObject target sits under what one worker takes
    max_sessions = int(config(docs)["MIDIMATCH_MAX_SESSIONS"])
    for t in triggers:
        target = int(t["metadata"].get("streamLength") or t["metadata"]["pendingEntriesCount"])
        assert 0 < target <= max_sessions


def test_probe_reads_a_metric_the_worker_exports():
    sys.path.insert(0, str(K8S / "images"))
    try:
        import probe
    finally:
        sys.path.pop(0)
    names, _ = exported_metrics()
    assert probe.STALLED in names


def test_prometheus_sends_the_token_when_the_gateway_guards_metrics():
    """With MIDIMATCH_AUTH_TOKEN set (the Secret's auth-token), the gateway answers /metrics
    only with the token unless the code leaves /metrics open."""
    from server import app

    docs = render("overlays/prod")
    pm = one(docs, "PodMonitor", "midimatch-gateway")
    gw = one(docs, "Deployment", "midimatch-gateway")
    sets_token = "MIDIMATCH_AUTH_TOKEN" in json.dumps(gw)
    guarded = "/metrics" not in getattr(app, "OPEN_PATHS", {"/metrics"})
    for ep in pm["spec"]["podMetricsEndpoints"]:
        if sets_token and guarded:
            cred = ep["authorization"]["credentials"]
            assert (cred["name"], cred["key"]) == ("midimatch-secrets", "auth-token")
