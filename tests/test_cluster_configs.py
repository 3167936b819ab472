"""The cluster configs in cluster/: Ray's own validation, KubeRay's CRD schemas, the
custom resources the actors ask for, and a live autoscaling run of cluster/local.yaml.

Actors request 1 unit of `trainer`, `generator`, `filter` or `env` per actor, so every
worker node type must offer exactly one of them and the head none.
"""

from __future__ import annotations

import copy
import json
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray_head import free_port, loopback_env, ray_head

from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# The v1 openAPIV3Schema of KubeRay's CRDs (descriptions removed), from shared/kuberay-crds.
CRD_SCHEMAS = Path(__file__).parent / "data" / "kuberay"
ROLES = ("trainer", "generator", "filter", "env")

YAMLS = sorted(p for p in CLUSTER.rglob("*.y*ml"))
# The C loader when PyYAML has it: the CRD files are ~20k lines each.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(path):
    return yaml.load(Path(path).read_text(), Loader=_Loader)


DOCS = {p: _load(p) for p in YAMLS}
AUTOSCALER = [p for p, d in DOCS.items() if isinstance(d, dict) and "available_node_types" in d]
KUBERAY = [p for p, d in DOCS.items() if isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/")]


def _ids(paths):
    return [str(p.relative_to(CLUSTER)) for p in paths]


def test_every_yaml_is_classified():
    assert {"aws.yaml", "local.yaml"} <= set(_ids(AUTOSCALER))
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= set(_ids(KUBERAY))
    assert set(AUTOSCALER) | set(KUBERAY) == set(YAMLS), "a YAML in cluster/ that no test checks"


# --------------------------------------------------------------------------- autoscaler


@pytest.mark.parametrize("path", AUTOSCALER, ids=_ids(AUTOSCALER))
def test_autoscaler_config_passes_ray_validation(path):
    config = copy.deepcopy(DOCS[path])
    if config["provider"]["type"] == "fake_multinode":
        # The autoscaler of `ray start --autoscaling-config` reads this file verbatim
        # (and Ray 2.60 ships no defaults for this provider), so validate it raw.
        validate_config(config)
    else:
        # What `ray up` does before talking to the cloud: merge defaults, then validate.
        validate_config(prepare_config(config))


def _role_of(resources):
    roles = [r for r in ROLES if r in resources]
    assert len(roles) <= 1, f"node type offers several roles: {roles}"
    return roles[0] if roles else None


@pytest.mark.parametrize("path", AUTOSCALER, ids=_ids(AUTOSCALER))
def test_autoscaler_node_types_offer_the_actor_resources(path):
    config = DOCS[path]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert _role_of(head["resources"]) is None
    assert head["resources"].get("CPU") == 0, "keep tasks and actors off the head"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    roles = {name: _role_of(t["resources"]) for name, t in workers.items()}
    assert sorted(r for r in roles.values() if r) == sorted(ROLES), roles
    for name, t in workers.items():
        assert roles[name] == name, f"node type {name!r} offers {roles[name]!r}"
        assert t["resources"][name] >= 1
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    if config["provider"]["type"] != "fake_multinode":
        for name in ("trainer", "generator"):
            gpus = workers[name]["resources"].get("GPU", 0)
            assert gpus >= 1, f"{name} nodes need GPUs"
            assert workers[name]["resources"][name] <= gpus, "one GPU per rank/generator"
        for name in ("filter", "env"):
            assert workers[name]["resources"].get("GPU", 0) == 0, f"{name} nodes are CPU only"


def test_aws_installs_the_synced_repo_and_keeps_token_auth():
    config = prepare_config(copy.deepcopy(DOCS[CLUSTER / "aws.yaml"]))
    assert config["file_mounts"]["~/iterft_ray"] == "."
    setup = config["head_setup_commands"] + config["worker_setup_commands"]
    for name in ("filter", "env"):
        setup += config["available_node_types"][name]["worker_setup_commands"]
    assert all("pip install" in c and "-e ~/iterft_ray" in c for c in setup), setup
    assert "download.pytorch.org/whl/cpu" not in " ".join(config["worker_setup_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)


def test_local_config_has_what_the_fake_provider_needs():
    config = DOCS[CLUSTER / "local.yaml"]
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    for key in ("use_node_id_as_ip", "disable_node_updaters", "disable_launch_config_check"):
        assert provider[key] is True, key
    assert config["head_node_type"] == "ray.head.default"  # fixed by the fake provider
    host, port = provider["gcs_address"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) != 6379


# ----------------------------------------------------------------------------- KubeRay


def _strict(schema):
    """The CRD schema with unknown fields rejected, as `kubectl apply` (strict field
    validation) does; the schema itself leaves additionalProperties open."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_schema(kind):
    crd = json.loads((CRD_SCHEMAS / f"{kind.lower()}s.v1.schema.json").read_text())
    assert crd["kind"] == kind
    return _strict(crd["openAPIV3Schema"])


def _cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("path", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_manifest_matches_crd_schema(path):
    doc = DOCS[path]
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob")
    validator = jsonschema.Draft7Validator(_crd_schema(doc["kind"]))
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_groups_offer_the_actor_resources(path):
    doc = DOCS[path]
    spec = _cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # What the Ray autoscaler in the head pod derives from this spec (it also runs
    # Ray's validate_config on the result).
    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": spec,
          "metadata": {"name": doc["metadata"]["name"], "namespace": "default"}}
    config = _derive_autoscaling_config_from_ray_cr(cr)
    types = config["available_node_types"]
    assert _role_of(types["headgroup"]["resources"]) is None
    assert types["headgroup"]["resources"]["CPU"] == 0
    workers = {k: v for k, v in types.items() if k != "headgroup"}
    assert sorted(workers) == sorted(ROLES)
    for name, t in workers.items():
        assert _role_of(t["resources"]) == name
        assert t["resources"][name] >= 1
        assert 0 <= t["min_workers"] <= t["max_workers"] and t["max_workers"] >= 1
    for name in ("trainer", "generator"):
        assert 1 <= workers[name]["resources"][name] <= workers[name]["resources"]["GPU"]
    for name in ("filter", "env"):
        assert "GPU" not in workers[name]["resources"]


def test_rayjob_runs_the_iterative_sft_entrypoint():
    doc = DOCS[CLUSTER / "kuberay" / "rayjob.yaml"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = argv[1]
    assert script == "jobs/iterative_sft.py"
    config = argv[argv.index("--config") + 1]
    assert config.startswith("jobs/configs/") and config.endswith(".yaml")
    assert (REPO / script).exists(), script
    assert (REPO / config).exists(), config
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    working_dir = runtime_env["working_dir"]
    assert working_dir.startswith("https://") and working_dir.endswith(".zip")


# ------------------------------------------------------------- live fake multi-node run


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray

    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=1, resources={"generator": 1})
    def where():
        return ray.get_runtime_context().get_node_id()

    t0 = time.monotonic()
    node = ray.get(where.remote(), timeout=40)
    elapsed = time.monotonic() - t0
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    print(json.dumps({"head": head, "before": before, "node": node,
                      "elapsed": elapsed, "resources": nodes.get(node, {})}))
    """
)

WRONG_TOKEN = textwrap.dedent(
    """
    import sys
    from ray._raylet import GcsClient
    try:
        GcsClient(address=sys.argv[1]).internal_kv_get(b"session_name", b"session", timeout=5)
    except Exception as e:
        print(type(e).__name__)
    else:
        print("ACCEPTED")
    """
)


@pytest.fixture
def fake_cluster():
    """cluster/local.yaml started with `RAY_FAKE_CLUSTER=1 ray start --head`, on
    loopback, with its own ports, temp dir and token; always stopped afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="iftc", dir="/tmp"))  # short: socket paths
    gcs_port, client_port, dashboard_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{gcs_port}"
    config = _load(CLUSTER / "local.yaml")
    config["provider"]["gcs_address"] = address
    (tmp / "local.yaml").write_text(yaml.safe_dump(config))
    (tmp / "token").write_text(secrets.token_hex(32))
    env = loopback_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_TOKEN_PATH=str(tmp / "token"))
    args = [
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
        "--include-dashboard=false", f"--dashboard-port={dashboard_port}", "--dashboard-agent-listen-port=0",
        "--num-cpus=0", "--object-store-memory=100000000", f"--temp-dir={tmp / 'ray'}",
        f"--autoscaling-config={tmp / 'local.yaml'}", "--disable-usage-stats",
    ]
    try:
        with ray_head(args, env, cwd=tmp):
            yield {"address": address, "env": env, "tmp": tmp}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(120)
def test_local_cluster_adds_a_generator_node_on_demand(fake_cluster):
    address, env = fake_cluster["address"], fake_cluster["env"]
    run = subprocess.run([sys.executable, "-c", DRIVER, address], env=env,
                         capture_output=True, text=True, timeout=75)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["before"] == [result["head"]], "worker nodes before any demand"
    assert result["node"] != result["head"]
    assert result["resources"].get("generator") == 1
    assert result["elapsed"] < 40

    # Token auth is on: the same cluster refuses a client with the wrong token.
    wrong = dict(env, RAY_AUTH_TOKEN="0" * 64)
    run = subprocess.run([sys.executable, "-c", WRONG_TOKEN, address], env=wrong,
                         capture_output=True, text=True, timeout=30)
    assert run.stdout.strip().splitlines()[-1] == "AuthenticationError", run.stdout + run.stderr
