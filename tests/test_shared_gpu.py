"""One GPU for both: a trainer and a generator placed on the one GPU of a Ray that declares a single GPU, with
fractional requests (`resources.trainer_gpus: 0.5`, `generator_gpus: 0.5`), and the GPU example config fitting it.

This machine has no GPU, so the actors run on CPU; Ray still accounts for the GPU they hold and gives both
the same GPU id, which is what a one-card user's run gets.
"""

from pathlib import Path

import pytest
import ray

from iterft_ray.actors.placement import PlacementError, actor_requests, check_cluster_fits
from iterft_ray.actors.trainer_actor import TrainerRank
from iterft_ray.config import ResourcesConfig, load_config
from iterft_ray.ray_trainer import RayIterativeSFTTrainer

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_gpu_ray(own_ray):
    ray.init(address="local", num_cpus=10, num_gpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def test_trainer_and_generator_share_the_one_gpu():
    resources = ResourcesConfig(trainer_gpus=0.5, generator_gpus=0.5, filter_cpus=0.5, start_timeout_s=120)
    rl = RayIterativeSFTTrainer("tiny-llama", {"learning_rate": 1e-3}, resources=resources)
    try:
        _, trainer_gpus = rl.trainer.call(TrainerRank.placement, on="rank0")[0]
        generator_gpus = ray.get(rl.generators[0].__ray_call__.remote(lambda actor: ray.get_gpu_ids()))
        assert trainer_gpus == [0] and [int(g) for g in generator_gpus] == [0]
        assert ray.available_resources().get("GPU", 0.0) == 0.0  # half each: the one GPU is held, by both
        rollouts = rl.generate(["1+1=", "2+3="], num_samples=2)
        assert rl.step(rl.filter(rollouts, [{"name": "length_bounds", "min_chars": 1}]))["updates"] == 1
    finally:
        rl.shutdown()


def test_gsm8k_example_fits_one_gpu_and_whole_gpus_each_do_not():
    config = load_config(ROOT / "jobs" / "configs" / "gsm8k_math.yaml")
    assert config.resources.trainer_gpus + config.resources.generator_gpus == 1
    assert config.sampling.vllm.enable_sleep_mode and config.sampling.vllm.gpu_memory_utilization < 1
    check_cluster_fits(actor_requests(config.resources))
    with pytest.raises(PlacementError, match=r"\{.*GPU: 2.*\} in all"):
        check_cluster_fits(actor_requests(ResourcesConfig(trainer_gpus=1, generator_gpus=1)))


@pytest.mark.parametrize("section,values,message", [
    ("resources", {"trainer_gpus": 1.5}, "resources.trainer_gpus: expected a share of one GPU"),
    ("resources", {"generator_gpus": 2.5}, "resources.generator_gpus: expected a share of one GPU"),
    ("resources", {"trainer_gpus": 0.5, "trainer_ranks": 2},
     "resources.trainer_gpus: 0.5 of a GPU per rank would put 2 ranks"),
    ("sampling", {"engine": "vllm", "vllm": {"gpu_memory_utilization": 1.2}},
     "sampling.vllm.gpu_memory_utilization: expected a number in (0, 1]"),
    ("sampling", {"vllm": {"enable_sleep_mode": True}}, "sampling.vllm.enable_sleep_mode: sleep mode is the vllm"),
])
def test_gpu_shares_that_cannot_be_placed_are_refused_at_load(section, values, message):
    with pytest.raises(ValueError) as info:
        load_config({"model": {"name_or_path": "tiny-llama"}, section: values})
    assert str(info.value).startswith(message)
