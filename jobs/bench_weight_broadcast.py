"""Benchmark: a weight version across nodes, object store (pull) against the trainer's broadcast.

    python jobs/bench_weight_broadcast.py [--json out.json] [--reps 5]

Starts a two-node Ray on this machine (`ray.cluster_utils.Cluster` on loopback, token
auth on): the trainer on the head, 2 generators on the second node, the 134M-parameter
fp32 Llama of jobs/bench_weight_sync.py (0.54 GB). Then, interleaved after a warm-up:

  object_store - the trainer's `publish` (one `ray.put` on its node) and every generator's
                 `sync` of it: each pulls the snapshot into its node's store and loads it.
  broadcast    - the trainer's rank 0 broadcasts the version in buckets over the Gloo
                 group it formed with the generators (`resources.weight_transport:
                 broadcast`), and every generator's `sync` loads what it received.

Both sides end with the version loaded in both generators; GB/s is the version's bytes
over that time. The nodes share this machine's cores and memory, so the "network" is
loopback: the figures compare the two paths' own costs, not a real network's.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import ray

from iterft_ray.config import ResourcesConfig, SamplingConfig
from iterft_ray.actors.trainer_actor import TrainerRank
from iterft_ray.ray_trainer import RayIterativeSFTTrainer
from iterft_ray.weights.sync import publish_from
from iterft_ray.tiny import build_tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import (  # noqa: E402
    column, environment, interleave, parser, print_environment, print_table, write_json,
)
from bench_weight_sync import MODEL_CONFIG  # noqa: E402


def two_node_cluster(tmp: Path):
    """A head (trainer, filter) and a second node (generator: 2), loopback only, token auth on."""
    from ray._private import ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    (tmp / "token").write_text(secrets.token_hex(32))
    for key in [k for k in os.environ if k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))]:
        del os.environ[key]
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "token"),
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    reset_auth_token_state()
    common = {"node_ip_address": "127.0.0.1", "temp_dir": str(tmp / "ray"), "object_store_memory": 2 * 10**9}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "num_cpus": 2, "resources": {"trainer": 1, "filter": 1},
        "include_dashboard": False, "dashboard_agent_listen_port": 0})
    cluster.add_node(**common, num_cpus=2, resources={"generator": 2})
    ray.init(address=cluster.address, logging_level="ERROR")
    return cluster


def main() -> None:
    args = parser(__doc__, reps=5, warmup=1).parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ifwb", dir="/tmp"))  # short: socket paths
    cluster = two_node_cluster(tmp)
    try:
        path = str(build_tiny_model("tiny-llama", tmp / "model", **MODEL_CONFIG))
        rt = RayIterativeSFTTrainer(
            path, {"output_dir": str(tmp / "trainer")},
            resources=ResourcesConfig(num_generators=2, filter_pool_size=1, custom_resources=True,
                                      weight_transport="broadcast"),
            sampling=SamplingConfig(engine="hf"))
        nbytes = ray.get(rt.weights).nbytes

        def next_version() -> int:
            """The same weights under a newer version (generators load only newer versions)."""
            return rt.trainer.call(TrainerRank.advance_version, rt.trainer.version() + 1)[0]

        def object_store() -> None:
            next_version()
            ref, version = publish_from(rt.trainer)
            ray.get([g.sync.remote([ref], version) for g in rt.generators])

        def broadcast() -> None:
            sync = rt.weight_sync
            sync.version = next_version()
            sync._broadcast()
            ray.get([g.sync.remote([sync.snapshot], sync.version) for g in rt.generators])

        print(f"model: {nbytes / 1e9:.3f} GB per version; trainer on the head, 2 generators on the second node")
        print_environment(environment())
        rows = interleave({"object_store": object_store, "broadcast": broadcast}, args.reps, args.warmup)
        froms = {i["loaded_from"] for i in ray.get([g.info.remote() for g in rt.generators])}
        table = print_table(f"{nbytes / 1e9:.3f} GB to 2 generators on another node", [
            ("object store: publish + pull + load", column(rows["object_store"], "s"), "s"),
            ("broadcast: Gloo buckets + load", column(rows["broadcast"], "s"), "s"),
            ("object store GB/s", [nbytes / 1e9 / r["s"] for r in rows["object_store"]], "GB/s"),
            ("broadcast GB/s", [nbytes / 1e9 / r["s"] for r in rows["broadcast"]], "GB/s"),
        ])
        print(f"last loads came from: {sorted(froms)}")
        write_json(args.json, {"bytes": nbytes, "reps": args.reps, "environment": environment(), "seconds": table})
        rt.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
