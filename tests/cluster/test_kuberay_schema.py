"""cluster/kuberay/*.yaml against the schemas the cluster itself enforces.

Every RayCluster / RayJob / RayService document is validated against the OpenAPI v3 schema of
the KubeRay v1.7.0 CRD for its kind (``../shared/kuberay-crds``, unchanged from KubeRay's
release), the way the API server does with ``kubectl apply --validate=strict``: structural
schemas reject unknown fields, so a misspelt or misplaced field fails here instead of on the
user's cluster. Every other document (Deployment, Service, PersistentVolumeClaim) is validated
against Kubernetes' own schema, strictly, by ``kubernetes-validate``.
"""

from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO_ROOT

KUBERAY_VERSION = "v1.7.0"
#: Like MEDKD_DATA_DIR for the data: the shared folder beside the checkout, or this variable.
CRD_DIR = Path(os.environ.get("MEDKD_KUBERAY_CRDS", REPO_ROOT.parent / "shared" / "kuberay-crds"))
KUBERAY_DIR = REPO_ROOT / "cluster" / "kuberay"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
#: The Kubernetes minor version whose core schemas the other documents must satisfy (KubeRay
#: v1.7.0 supports 1.27+; a manifest valid for 1.30 is valid for every later 1.x so far).
KUBERNETES_VERSION = "1.30"


def _crd_path(kind: str) -> Path:
    path = CRD_DIR / CRD_FILES[kind]
    assert CRD_DIR.is_dir(), (
        f"the KubeRay {KUBERAY_VERSION} CRDs are missing: {CRD_DIR} does not exist (expected beside the checkout "
        "as ../shared/kuberay-crds, or set MEDKD_KUBERAY_CRDS)"
    )
    assert path.is_file(), f"{path} is missing from {CRD_DIR}"
    return path


def strict_structural(schema: Any) -> Any:
    """A copy of a CRD's OpenAPI v3 schema in which every object that lists its ``properties``
    (and does not opt out with ``x-kubernetes-preserve-unknown-fields``) rejects other fields,
    as the API server's strict field validation does.

    Examples:
        >>> strict_structural({"type": "object", "properties": {"a": {"type": "string"}}})["additionalProperties"]
        False
    """
    if isinstance(schema, list):
        return [strict_structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_structural(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A JSON-schema validator for ``kind`` from its CRD's served ``v1`` version."""
    crd = yaml.load(_crd_path(kind).read_text(), Loader=yaml.CSafeLoader)  # 1 MB each: the C loader
    assert crd["spec"]["names"]["kind"] == kind, f"{CRD_FILES[kind]} defines {crd['spec']['names']['kind']}"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    schema = strict_structural(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def _documents() -> list[tuple[str, int, dict]]:
    return [
        (path.name, index, doc)
        for path in sorted(KUBERAY_DIR.glob("*.yaml"))
        for index, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc is not None
    ]


def _errors_of(validator: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


@pytest.mark.parametrize("name, index, doc", _documents(), ids=lambda v: v if isinstance(v, str) else None)
def test_manifest_document_validates_against_its_schema(name, index, doc):
    where = f"{name} document {index} ({doc.get('kind')} {doc.get('metadata', {}).get('name')})"
    if doc.get("kind") in CRD_FILES:
        assert doc["apiVersion"] == "ray.io/v1", f"{where}: apiVersion {doc['apiVersion']}"
        errors = _errors_of(crd_validator(doc["kind"]), doc)
        assert not errors, f"{where} does not validate against the KubeRay {KUBERAY_VERSION} CRD:\n" + "\n".join(errors)
    else:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{where} does not validate against Kubernetes {KUBERNETES_VERSION}: {path}: {error.message}")


def test_every_kuberay_kind_is_in_the_manifests():
    kinds = {doc["kind"] for _, _, doc in _documents()}
    assert set(CRD_FILES) <= kinds


def test_the_schema_check_rejects_a_misplaced_field_and_a_wrong_type():
    """The check must be able to fail: a field KubeRay does not know, and a string where it wants a number."""
    (doc,) = [doc for name, _, doc in _documents() if doc["kind"] == "RayCluster"]
    misspelt = copy.deepcopy(doc)
    misspelt["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert any("maxReplica" in error for error in _errors_of(crd_validator("RayCluster"), misspelt))
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    assert any("minReplicas" in error for error in _errors_of(crd_validator("RayCluster"), wrong_type))
    misplaced_probe = copy.deepcopy(doc)
    misplaced_probe["spec"]["headGroupSpec"]["template"]["spec"]["livenessProbe"] = {"tcpSocket": {"port": 6379}}
    assert _errors_of(crd_validator("RayCluster"), misplaced_probe)


def test_a_missing_crd_directory_is_a_clear_failure(monkeypatch, tmp_path):
    monkeypatch.setattr(f"{__name__}.CRD_DIR", tmp_path / "nowhere")
    with pytest.raises(AssertionError, match="KubeRay v1.7.0 CRDs are missing: .*nowhere does not exist"):
        _crd_path("RayCluster")


def test_token_auth_uses_kuberay_auth_options_with_the_documented_secret():
    """KubeRay >= 1.7.0 wiring: ``authOptions`` names the secret the docs create; the operator
    injects RAY_AUTH_MODE / RAY_AUTH_TOKEN into every Ray container and the autoscaler, so no
    manifest sets them by hand (two sources of one token drift apart)."""
    readme = (REPO_ROOT / "cluster" / "README.md").read_text()
    assert "kubectl create secret generic medkd-ray-auth --from-literal=auth_token=" in readme
    for name, _, doc in _documents():
        if doc["kind"] not in CRD_FILES:
            continue
        cluster = {
            "RayCluster": lambda d: d["spec"],
            "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"],
        }[doc["kind"]](doc)
        assert cluster["authOptions"] == {"mode": "token", "secretName": "medkd-ray-auth"}, name
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        env_lists = [cluster.get("autoscalerOptions", {}).get("env", [])]
        env_lists += [
            container.get("env", []) for group in groups for container in group["template"]["spec"]["containers"]
        ]
        for env in env_lists:
            assert not {item["name"] for item in env} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, name
        assert f"KubeRay >= {KUBERAY_VERSION.lstrip('v')}" in (KUBERAY_DIR / name).read_text(), name
