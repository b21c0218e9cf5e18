"""Validation of rendered objects against the real schemas (a test helper).

- Core Kubernetes objects: ``kubernetes-validate`` (the API's published schemas), strict.
- Custom resources: the ``openAPIV3Schema`` of a CRD file, as the API server applies it:
  ``nullable``, ``x-kubernetes-int-or-string``, ``x-kubernetes-preserve-unknown-fields``
  and unknown fields refused (``kubectl``'s strict field validation). Upstream CRDs are
  read from ``tests/data/crds`` (copies, with their sources: its README.md); ours from
  ``deploy/crds``.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_CRD_DIR = ROOT / "tests" / "data" / "crds"
OUR_CRDS = ROOT / "deploy" / "crds"
KUBERNETES_VERSION = "1.37.0"


def validate_core(obj: dict[str, Any]) -> None:
    """Raise if ``obj`` does not fit the Kubernetes schema of its kind (unknown fields refused)."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def load_crd(path: Path) -> dict[str, Any]:
    """One CRD document from a ``.yaml`` or ``.yaml.gz`` file."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as compressed:
            text = compressed.read()
    else:
        text = path.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert len(docs) == 1, path
    crd: dict[str, Any] = docs[0]
    return crd


def _json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) → JSON Schema draft 4 (same min/exclusiveMinimum semantics)."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _json_schema(v)
        for k, v in node.items()
        if not k.startswith("x-kubernetes-") and k not in ("nullable", "format", "properties", "items")
    }
    if "properties" in node:
        out["properties"] = {k: _json_schema(v) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = _json_schema(node["items"])
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
        out.pop("anyOf", None)
    closed = "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields")
    if node.get("type") == "object" and "properties" in node and closed:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """The JSON Schema of ``version`` of a CRD."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Any] = _json_schema(entry["schema"]["openAPIV3Schema"])
            # The API server always accepts these at the root, declared or not (Istio's CRDs do not).
            schema["properties"].update({"apiVersion": {"type": "string"}, "kind": {"type": "string"}})
            schema["properties"]["metadata"] = {"type": "object"}
            return schema
    raise AssertionError(f"{crd['metadata']['name']} has no version {version}")


def validate_custom(obj: dict[str, Any], crd: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``obj`` does not fit the CRD's schema."""
    assert obj["apiVersion"].split("/")[0] == crd["spec"]["group"]
    assert obj["kind"] == crd["spec"]["names"]["kind"]
    jsonschema.Draft4Validator(crd_schema(crd, obj["apiVersion"].split("/")[1])).validate(obj)


UPSTREAM_CRDS = {
    "HTTPRoute": "gateway.networking.k8s.io_httproutes.yaml",
    "EnvoyExtensionPolicy": "gateway.envoyproxy.io_envoyextensionpolicies.yaml",
    "EnvoyFilter": "networking.istio.io_envoyfilters.yaml",
}


def validate_any(obj: dict[str, Any]) -> None:
    """Validate a rendered object: core kinds by kubernetes-validate, the rest by their CRD."""
    kind = obj["kind"]
    if kind in UPSTREAM_CRDS:
        crd, strict = load_crd(UPSTREAM_CRD_DIR / UPSTREAM_CRDS[kind]), False
    elif obj["apiVersion"].startswith("mcp.extproc.io/"):
        crd, strict = load_crd(OUR_CRDS / f"mcp.extproc.io_{kind.lower()}s.yaml".replace("policys", "policies")), True
    else:
        validate_core(obj)
        return
    validate_custom(obj, crd)
    problems = cel_violations(openapi_schema(crd, obj["apiVersion"].split("/")[1]), obj, strict=strict)
    assert not problems, f"{kind} {obj['metadata'].get('name')}: {problems}"


def cel_violations(schema: dict[str, Any], value: Any, path: str = "", *, strict: bool = True) -> list[str]:
    """Evaluate every ``x-kubernetes-validations`` rule of ``schema`` over ``value`` (cel-python).

    Transition rules (``oldSelf``) are skipped: there is no old object at creation. With
    ``strict`` a rule cel-python cannot compile is an error; otherwise it is skipped
    (upstream CRDs use Kubernetes' CEL extensions, which cel-python lacks).
    """
    import celpy

    found: list[str] = []
    if value is None:
        return found
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        try:
            program = env.program(env.compile(rule["rule"]))
            verdict = program.evaluate({"self": celpy.json_to_cel(value)})
        except Exception:
            if strict:
                raise
            continue
        if verdict is not True and not (isinstance(verdict, celpy.celtypes.BoolType) and bool(verdict)):
            found.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, child in value.items():
            sub = schema.get("properties", {}).get(key) or (
                schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
            )
            if sub is not None:
                found += cel_violations(sub, child, f"{path}.{key}", strict=strict)
    elif isinstance(value, list) and "items" in schema:
        for i, child in enumerate(value):
            found += cel_violations(schema["items"], child, f"{path}[{i}]", strict=strict)
    return found


def openapi_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """The raw ``openAPIV3Schema`` of ``version`` (with its CEL rules)."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"{crd['metadata']['name']} has no version {version}")
