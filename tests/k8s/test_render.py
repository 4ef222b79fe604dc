"""Every kustomization renders, and says what docs/deploy.md says it does."""

from __future__ import annotations

from tests.k8s.conftest import find, one, pod_specs, render


def _container(deploy: dict, name: str) -> dict:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def test_every_target_renders(target):
    docs = render(target)
    assert docs, f"k8s/{target} rendered nothing"
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "midimatch", d["kind"]


def test_dev_is_one_cpu_worker_and_one_gateway_with_in_cluster_redis():
    docs = render("overlays/dev")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "midimatch-dev"}
    gw, wk = one(docs, "Deployment", "midimatch-gateway"), one(docs, "Deployment",
                                                                 "midimatch-worker")
    assert gw["spec"]["replicas"] == 1 and wk["spec"]["replicas"] == 1
    worker = _container(wk, "worker")
    assert worker["image"].endswith("-cpu")
    assert "nvidia.com/gpu" not in str(worker["resources"])
    assert one(docs, "ConfigMap", "midimatch-config")["data"]["MIDIMATCH_DEVICE"] == "cpu"
    one(docs, "Deployment", "midimatch-redis")
    one(docs, "Secret", "midimatch-secrets")  # the dev placeholders
    assert not find(docs, "ScaledObject")


def test_prod_has_gpu_workers_autoscaling_and_monitoring_and_no_placeholder_secret():
    docs = render("overlays/prod")
    wk = one(docs, "Deployment", "midimatch-worker")
    res = _container(wk, "worker")["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    assert one(docs, "ConfigMap", "midimatch-config")["data"]["MIDIMATCH_DEVICE"] == "cuda"
    assert not _container(wk, "worker")["image"].endswith("-cpu")
    assert not find(docs, "Secret"), "prod must not ship the repository's placeholder Secret"
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in find(docs, "ScaledObject")}
    assert set(scaled) == {"midimatch-worker", "midimatch-gateway"}
    assert {t["type"] for t in scaled["midimatch-worker"]["spec"]["triggers"]} == {
        "redis-streams"}
    assert "connections_active" in str(scaled["midimatch-gateway"]["spec"]["triggers"])
    # zero workers would make every gateway unready (/readyz needs a live worker)
    assert scaled["midimatch-worker"]["spec"]["minReplicaCount"] >= 1
    for kind in ("PodMonitor", "PrometheusRule", "TriggerAuthentication"):
        assert find(docs, kind), kind
    dash = one(docs, "ConfigMap", "midimatch-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_managed_redis_component_removes_the_in_cluster_one():
    """An overlay of prod + components/managed-redis: no Redis Deployment/Service, the address
    and TLS scheme point at the managed one, KEDA's triggers use TLS."""
    from tests.k8s.conftest import render_managed

    docs = render_managed()
    assert not find(docs, "Deployment", "midimatch-redis")
    assert not find(docs, "Service", "midimatch-redis")
    assert not find(docs, "NetworkPolicy", "midimatch-redis")
    data = one(docs, "ConfigMap", "midimatch-config")["data"]
    assert data["REDIS_SCHEME"] == "rediss" and "midimatch-redis" not in data["REDIS_ADDRESS"]
    for so in find(docs, "ScaledObject", "midimatch-worker"):
        for t in so["spec"]["triggers"]:
            assert t["metadata"]["enableTLS"] == "true"


def test_workers_outlive_a_session_hand_back_and_roll_one_at_a_time():
    for target in ("overlays/dev", "overlays/prod"):
        docs = render(target)
        wk = one(docs, "Deployment", "midimatch-worker")
        data = one(docs, "ConfigMap", "midimatch-config")["data"]
        lease_s = int(data["MIDIMATCH_LEASE_MS"]) / 1000
        # hand-back = the running tick (≤ a few s) + release; past a lease, others own them
        assert wk["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 6 * lease_s
        assert wk["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        pdbs = {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
                for p in find(docs, "PodDisruptionBudget")}
        assert {"midimatch-worker", "midimatch-gateway"} <= pdbs


def test_every_workload_spreads_over_nodes_except_singletons():
    for target in ("overlays/dev", "overlays/prod"):
        for name, spec in pod_specs(render(target)):
            if name.endswith(("midimatch-redis", "index-build")):
                continue
            keys = {c["topologyKey"] for c in spec.get("topologySpreadConstraints", [])}
            assert "kubernetes.io/hostname" in keys, name
