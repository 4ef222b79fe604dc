"""The rendered manifests validate offline: built-in kinds against the Kubernetes OpenAPI
schemas shipped by kubernetes-validate (strict: unknown fields fail), for the oldest and a
current supported Kubernetes; the CRDs (KEDA, Prometheus Operator), which it has no schema for,
against the JSON schemas in tests/k8s/schemas/ (the fields k8s/ uses, written from upstream's
documentation; unknown fields fail there too)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from tests.k8s.conftest import render, render_managed

SCHEMAS = Path(__file__).with_name("schemas")
KUBERNETES_VERSIONS = ("1.30.0", "1.32.0")


def crd_schema(doc: dict) -> dict | None:
    group_version = doc["apiVersion"].replace("/", "_")
    path = SCHEMAS / f"{group_version}_{doc['kind']}.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate(target, version):
    _validate(render(target), target, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_prod_with_managed_redis_validates(version):
    _validate(render_managed(), "overlays/prod + components/managed-redis", version)


def _validate(docs: list[dict], target: str, version: str) -> None:
    checked = 0
    for doc in docs:
        what = f"k8s/{target}: {doc['kind']}/{doc['metadata']['name']}"
        schema = crd_schema(doc)
        if schema is not None:
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
            assert not errors, f"{what}: " + "; ".join(
                f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
        else:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"{what}: no schema (a CRD needs one in tests/k8s/schemas/)")
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{what} (Kubernetes {version}): {e.message} at "
                            f"{'/'.join(map(str, e.path))}")
        checked += 1
    assert checked


def test_the_crd_schemas_catch_a_typo():
    """The hand-written schemas are strict enough to matter."""
    so = next(d for d in render("overlays/prod") if d["kind"] == "ScaledObject")
    schema = crd_schema(so)
    bad = json.loads(json.dumps(so))
    bad["spec"]["triggers"][0]["metadata"]["streamLenght"] = "5"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))
    bad = json.loads(json.dumps(so))
    bad["spec"]["minReplicas"] = 1
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))
