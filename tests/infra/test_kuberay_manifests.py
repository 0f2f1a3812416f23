"""infra/ray/: the KubeRay manifests against KubeRay's own CRD schemas, the `ray up` config against
Ray's, what the manifests run against this checkout's configs, and that no secret is in them.

The CRD schemas are vendored from a KubeRay release (tests/infra/assets/kuberay/README.md). They
are applied strictly: an object schema that lists its properties rejects keys it does not list
(Kubernetes would prune them silently), so a misspelt key fails here. KubeRay's CEL rules
(`x-kubernetes-validations`) and the operator's own Go-side checks are not evaluated.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import re
import shlex
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from config.paths import REPO_ROOT

KUBERAY_RELEASE = "v1.7.0"
ASSETS = Path(__file__).parent / "assets" / "kuberay" / KUBERAY_RELEASE
RAY_DIR = REPO_ROOT / "infra" / "ray"
MANIFEST_DIR = RAY_DIR / "kuberay"
CLUSTER_YAML = RAY_DIR / "cluster.yaml"
APP_DIR = "/home/ray/hstu-rt"  # where the image holds the checkout

# kind -> (file, sha256 of the decompressed JSON, as in the assets README)
SCHEMAS = {
    "RayCluster": (
        "ray.io_rayclusters.v1.json.gz",
        "d89bddc296dbd61d51f23787a1e58502419f7844c4bdb145140bca6d41abd27b",
    ),
    "RayJob": ("ray.io_rayjobs.v1.json.gz", "59a7f922ef11bcf7333eef8ad515a2cc40a8ecc88f2b1472a435e87a686f4957"),
    "RayService": (
        "ray.io_rayservices.v1.json.gz",
        "adb22daf46bfa96b58cec6b68e9ecda59fefd516a4c0f173fd9549ab8c9ff587",
    ),
}


# ------------------------------------------------------------------------------ loading
def _raw_schema(kind: str) -> bytes:
    name, _ = SCHEMAS[kind]
    return gzip.decompress((ASSETS / name).read_bytes())


def strict(schema: Any) -> Any:
    """A copy of a structural schema in which objects with `properties` reject unlisted keys."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = strict(value)
        else:
            out[key] = value
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields", False)
    ):
        out["additionalProperties"] = False
    return out


@cache
def validator(kind: str) -> jsonschema.Draft4Validator:
    """Structural schemas are OpenAPI 3.0 schemas, a subset of JSON Schema draft 4."""
    schema = strict(json.loads(_raw_schema(kind)))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every violation of `doc`'s CRD schema, as `path: message`."""
    errors = sorted(validator(doc["kind"]).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def manifest_files() -> list[Path]:
    return sorted(MANIFEST_DIR.glob("*.yaml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in manifest_files():
        for i, doc in enumerate(load_docs(path)):
            if str(doc.get("apiVersion", "")).startswith("ray.io/"):
                out.append((f"{path.relative_to(REPO_ROOT)}#{i}:{doc.get('kind')}", doc))
    return out


def the_one(kind: str) -> dict[str, Any]:
    docs = [doc for _, doc in kuberay_docs() if doc["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind} under {MANIFEST_DIR}, found {len(docs)}"
    return copy.deepcopy(docs[0])


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


# ------------------------------------------------------------------------------ the schemas
@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_vendored_schema_is_the_named_release(kind: str) -> None:
    _, digest = SCHEMAS[kind]
    assert hashlib.sha256(_raw_schema(kind)).hexdigest() == digest, (
        f"{SCHEMAS[kind][0]} is not the KubeRay {KUBERAY_RELEASE} schema the assets README names"
    )
    schema = json.loads(_raw_schema(kind))
    assert set(schema["properties"]) >= {"apiVersion", "kind", "metadata", "spec"}


def test_every_ray_manifest_has_a_schema() -> None:
    kinds = [doc["kind"] for _, doc in kuberay_docs()]
    assert "RayJob" in kinds and "RayService" in kinds, (
        f"infra/ray/kuberay/ must hold a RayJob and a RayService: {kinds}"
    )
    for name, doc in kuberay_docs():
        assert doc["apiVersion"] == "ray.io/v1", f"{name}: apiVersion {doc['apiVersion']!r}, the schemas are ray.io/v1"
        assert doc["kind"] in SCHEMAS, f"{name}: no vendored schema for kind {doc['kind']!r}"


@pytest.mark.parametrize(("name", "doc"), kuberay_docs(), ids=[name for name, _ in kuberay_docs()])
def test_manifest_matches_its_crd_schema(name: str, doc: dict[str, Any]) -> None:
    errors = schema_errors(doc)
    assert not errors, f"{name} does not match the KubeRay {KUBERAY_RELEASE} {doc['kind']} schema:\n" + "\n".join(
        errors
    )


def _rename(node: dict[str, Any], old: str, new: str) -> None:
    node[new] = node.pop(old)


MUTATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], None], str]] = {
    # id: (kind, mutation, a fragment of the expected error)
    "misspelt-spec-key": ("RayJob", lambda d: _rename(d["spec"], "entrypoint", "entrypont"), "entrypont"),
    "misspelt-pod-key": (
        "RayJob",
        lambda d: _rename(cluster_spec(d)["headGroupSpec"]["template"]["spec"], "containers", "container"),
        "container",
    ),
    "start-param-not-a-string": (
        "RayJob",
        lambda d: cluster_spec(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "is not of type 'string'",
    ),
    "replicas-not-an-int": (
        "RayJob",
        lambda d: cluster_spec(d)["workerGroupSpecs"][0].update(replicas="two"),
        "is not of type 'integer'",
    ),
    "worker-group-without-name": (
        "RayJob",
        lambda d: cluster_spec(d)["workerGroupSpecs"][0].pop("groupName"),
        "'groupName' is a required property",
    ),
    "unknown-auth-mode": (
        "RayJob",
        lambda d: cluster_spec(d)["authOptions"].update(mode="password"),
        "is not one of ['disabled', 'token']",
    ),
    "env-from-secret-without-key": (
        "RayJob",
        lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][-1]["valueFrom"][
            "secretKeyRef"
        ].pop("key"),
        "'key' is a required property",
    ),
    "service-without-cluster": (
        "RayService",
        lambda d: d["spec"].pop("rayClusterConfig"),
        "'rayClusterConfig' is a required property",
    ),
    "serve-config-not-a-string": (
        "RayService",
        lambda d: d["spec"].update(serveConfigV2=yaml.safe_load(d["spec"]["serveConfigV2"])),
        "is not of type 'string'",
    ),
    "unknown-network-policy-mode": (
        "RayService",
        lambda d: cluster_spec(d)["networkPolicy"].update(mode="AllowAll"),
        "'AllowAll' is not one of",
    ),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_a_broken_manifest_is_rejected(case: str) -> None:
    kind, mutate, expected = MUTATIONS[case]
    doc = the_one(kind)
    assert not schema_errors(doc)
    mutate(doc)
    errors = schema_errors(doc)
    assert errors, f"{case}: the mutated {kind} passed the schema"
    assert any(expected in error for error in errors), f"{case}: expected an error about {expected!r}, got {errors}"


# ------------------------------------------------------------------------------ what they run
def entrypoint_argv(doc: dict[str, Any]) -> list[str]:
    """The RayJob's entrypoint as argv, with the image's checkout path mapped onto this checkout."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    return [arg.replace(APP_DIR, str(REPO_ROOT)) for arg in argv]


def test_rayjob_runs_the_stream_trainer_with_a_valid_config() -> None:
    from trainer.stream import load_stream_config
    from trainer.stream_train import parse_args

    argv = entrypoint_argv(the_one("RayJob"))
    assert argv[0] == "python" and Path(argv[1]) == REPO_ROOT / "trainer" / "stream_train.py", argv
    # The entrypoint is handed on by the submitter's shell: no operators that it would run itself.
    assert not {"&&", "||", ";", "|"} & set(argv), argv
    args, overrides = parse_args(argv[2:])
    assert Path(args.config).is_file(), f"the entrypoint's --config {args.config} is not in the checkout"
    config = load_stream_config(args.config, overrides)
    assert config.streaming.source_spec().kind == "kafka"
    assert config.streaming.feast.online_store == "redis", "several nodes share the sequences: use Redis"
    assert not config.stop.until_idle and config.stop.max_events is None, "the deployed trainer runs until stopped"


def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's pydantic models, on import
def test_rayservice_deploys_the_serving_app_of_serving_config_yaml() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.config import load_follow_config, load_serving_config

    deployed = serve_config(the_one("RayService"))
    ServeDeploySchema.model_validate(deployed)
    local = yaml.safe_load((REPO_ROOT / "serving" / "config.yaml").read_text(encoding="utf-8"))
    ((app,), (local_app,)) = deployed["applications"], local["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == local_app[key], f"serveConfigV2 {key} {app[key]!r} != serving/config.yaml's"
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in local_app["deployments"]]
    for dep, local_dep in zip(app["deployments"], local_app["deployments"]):
        assert dep["user_config"] == local_dep["user_config"]
        load_follow_config(dep["user_config"])
        assert set(dep["autoscaling_config"]) == set(local_dep["autoscaling_config"])
    config = load_serving_config(app["args"])
    assert config.features.online_store == "redis", "replicas on several nodes share the sequences: use Redis"


# ------------------------------------------------------------------------------ exposure
@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_nothing_is_exposed_outside_the_cluster_by_default(kind: str) -> None:
    doc = the_one(kind)
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert spec["authOptions"]["mode"] == "token", "Ray's ports (dashboard, job API, GCS) need the cluster token"
    assert spec["networkPolicy"]["mode"] in ("DenyAll", "DenyAllIngress")
    if kind == "RayService":
        assert doc["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


# ------------------------------------------------------------------------------ the `ray up` config
def test_cluster_yaml_is_a_valid_ray_cluster_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))
    validate_config(prepare_config(copy.deepcopy(config)))
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard must bind 127.0.0.1 by default"
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start, "Ray's token auth is off"
    config["max_worker"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


# ------------------------------------------------------------------------------ secrets
SECRET_NAME = re.compile(r"pass(word|wd)?|secret|token|credential|api[_-]?key|private[_-]?key", re.IGNORECASE)
SECRET_IN_TEXT = re.compile(
    r"(?:pass(?:word|wd)?|secret|token|api[_-]?key)\s*[=:]\s*(?!\s*$)\S+"  # password=..., token: ...
    r"|://[^/\s:@]*:[^/\s@]+@",  # credentials in a URL: redis://user:pw@host
    re.IGNORECASE,
)
# Values that name where a secret lives rather than being one.
ALLOWED_TEXT = re.compile(r"~/\.ray/auth_token|RAY_AUTH_MODE=token|mode:\s*token")


def _is_reference(value: Any) -> bool:
    """A file path or an environment variable: where a secret lives, not the secret."""
    return isinstance(value, str) and (value.startswith(("/", "~/", "./", "$")) or bool(ALLOWED_TEXT.fullmatch(value)))


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) for every mapping entry and list item, descending into embedded YAML."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield f"{path}[{i}]", None, value
            yield from _walk(value, f"{path}[{i}]")
    elif isinstance(node, str) and "\n" in node:
        try:
            embedded = yaml.safe_load(node)
        except yaml.YAMLError:
            return
        if isinstance(embedded, (dict, list)):
            yield from _walk(embedded, f"{path}<yaml>")


def literal_secrets(doc: Any, where: str) -> list[str]:
    """Places in a manifest where a secret is written in, rather than referenced."""
    found = []
    if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        found.append(f"{where}: a Secret with data: create it with kubectl from a file, never in the repo")
    for path, key, value in _walk(doc, where):
        if isinstance(value, dict) and "name" in value and ("value" in value or "valueFrom" in value):
            if SECRET_NAME.search(str(value["name"])):  # an env var: secrets only through secretKeyRef
                if "value" in value or "secretKeyRef" not in (value.get("valueFrom") or {}):
                    found.append(f"{path}: env {value['name']} must come from a secretKeyRef")
        elif isinstance(key, str) and SECRET_NAME.search(key) and isinstance(value, (str, int, float)):
            # *_env / *_file name where a secret is read from (an environment variable, a file)
            names_a_source = key.endswith(("_env", "_file")) and isinstance(value, str)
            if key not in ("secretName", "mode") and value != "" and not _is_reference(value) and not names_a_source:
                found.append(f"{path}: {key} holds a literal value")
        if isinstance(value, str) and not ALLOWED_TEXT.fullmatch(value.strip()):
            for line in value.splitlines():
                if SECRET_IN_TEXT.search(ALLOWED_TEXT.sub("", line)):
                    found.append(f"{path}: {line.strip()!r} looks like a secret written in")
    return found


def ray_infra_docs() -> list[tuple[str, Any]]:
    out = []
    for path in sorted(RAY_DIR.rglob("*.yaml")):
        for i, doc in enumerate(load_docs(path)):
            out.append((f"{path.relative_to(REPO_ROOT)}#{i}", doc))
    return out


def literal_secrets_in_text(text: str, where: str) -> list[str]:
    """Lines (comments included) that write a secret in: `password=...`, `token: ...`, `://u:p@`."""
    return [
        f"{where}:{number}: {line.strip()!r} looks like a secret written in"
        for number, line in enumerate(text.splitlines(), 1)
        if SECRET_IN_TEXT.search(ALLOWED_TEXT.sub("", line))
    ]


def test_no_manifest_holds_a_literal_secret() -> None:
    docs = ray_infra_docs()
    assert len(docs) >= 3
    found = [finding for where, doc in docs for finding in literal_secrets(doc, where)]
    for path in sorted(RAY_DIR.rglob("*.yaml")):
        found += literal_secrets_in_text(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT)))
    assert not found, "secrets must come from Kubernetes Secrets (secretKeyRef) or the environment:\n" + "\n".join(
        found
    )


def test_passwords_reach_the_pods_through_secret_key_refs() -> None:
    for kind, wanted in (
        ("RayJob", {"HSTU_KAFKA_SASL_PASSWORD", "HSTU_REDIS_PASSWORD"}),
        ("RayService", {"HSTU_REDIS_PASSWORD"}),
    ):
        spec = cluster_spec(the_one(kind))
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for template in templates:
            env = {e["name"]: e for c in template["spec"]["containers"] for e in c.get("env", [])}
            for name in wanted:
                assert name in env, f"{kind}: a pod lacks {name}"
                assert set(env[name]["valueFrom"]) == {"secretKeyRef"}, f"{kind}: {name} must be a secretKeyRef"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda env: env.append({"name": "HSTU_REDIS_PASSWORD", "value": "hunter2"}),
        lambda env: env.append(
            {"name": "KAFKA_SASL_PASSWORD", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
        ),
        lambda env: env.append({"name": "REDIS_URL", "value": "redis://default:hunter2@redis:6379"}),
        lambda env: env.append({"name": "JAVA_TOOL_OPTIONS", "value": "-Dsasl.password=hunter2"}),
    ],
    ids=["literal-password", "password-from-configmap", "password-in-url", "password-in-option"],
)
def test_a_literal_secret_is_caught(mutate: Callable[[list[dict[str, Any]]], None]) -> None:
    doc = the_one("RayJob")
    assert not literal_secrets(doc, "rayjob")
    mutate(cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"])
    assert literal_secrets(doc, "rayjob")


def test_a_secret_in_embedded_yaml_or_a_secret_object_is_caught() -> None:
    doc = the_one("RayService")
    serve = serve_config(doc)
    serve["applications"][0]["args"]["features"]["redis_password"] = "hunter2"
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve)
    assert any("redis_password" in f for f in literal_secrets(doc, "rayservice"))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringData": {"password": "hunter2"}}
    assert literal_secrets(secret, "secret")
    assert literal_secrets_in_text("  # the broker's sasl.password=hunter2\n", "comment")
