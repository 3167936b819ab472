"""RayIterativeSFTTrainer: the seed API's feel for driver scripts, with the work done by Ray actors.

    trainer = RayIterativeSFTTrainer("tiny-llama", args={"learning_rate": 1e-3})
    rollouts = trainer.generate(["12+30=", "7+5="], num_samples=4)   # references
    scored = trainer.filter(rollouts, [my_reward_fn])                 # references
    stats = trainer.step(scored)                                      # small dict
    trainer.sync_weights()                                            # generators catch up

Rollout data stays in the object store; the driver holds references and reads only
summaries, unless it asks for rows with `collect`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa
import ray

from iterft_ray.actors.env_pool import EnvPool
from iterft_ray.actors.failures import ActorRoster, Deadline, roster_of, round_timeout
from iterft_ray.actors.filter_pool import FilterPool
from iterft_ray.actors.generator_pool import GeneratorPool
from iterft_ray.actors.placement import (actor_options, check_cluster_fits, format_resources, run_requests,
                                         not_started, placement_timeout, wait_started)
from iterft_ray.actors.reward_pool import RewardModelPool, reward_models_of
from iterft_ray.actors.trainer_actor import TrainerRank
from iterft_ray.actors.trainer_group import TrainerGroup
from iterft_ray.actors.warm import end_idle_actors
from iterft_ray.config import (EnvConfig, ModelConfig, ResourcesConfig, SamplingConfig, check_lora_serving,
                               check_model_sources, check_trainer_args)
from iterft_ray.data.prompts import prompt_table
from iterft_ray.data.rollouts import ScoredRollouts
from iterft_ray.envs.runner import EnvRun
from iterft_ray.ray_start import init_ray
from iterft_ray.storage import StoragePath
from iterft_ray.weights.sync import WeightSync


class RayIterativeSFTTrainer:
    """A trainer actor group, a generator pool and a filter pool, driven one call at a time.

    The pieces: `trainer` (TrainerGroup), `generators` (GeneratorPool), `filter_pool` (FilterPool),
    `reward_pool` (RewardModelPool: actors for the reward models `filters` name; the filter actors
    call them), `env_pool` (EnvPool: where an `env`'s environments run; None without one), and
    `weight_sync` (WeightSync: the current weight version and how it reaches the generators).
    """

    def __init__(
        self,
        model: str | ModelConfig,
        args: dict[str, Any] | None = None,
        *,
        resources: ResourcesConfig | None = None,
        sampling: SamplingConfig | None = None,
        filters: list | None = None,
        filter_timeout_s: float = 10.0,
        checkpoint: StoragePath | str | None = None,
        env: EnvConfig | None = None,
        system_prompt: str | None = None,
    ):
        """`model`: a path, hub name or tiny name, or a whole `ModelConfig` (tokenizer, LoRA, ...).

        `env`: generators sample trajectories in this multi-turn environment (`iterft_ray.envs`), their prompts
        as chat messages after `system_prompt`; its environments run in `resources.num_env_workers` actors."""
        self.model = model if isinstance(model, ModelConfig) else ModelConfig(name_or_path=model)
        self.resources = resources or ResourcesConfig()
        self.sampling = sampling or SamplingConfig()
        check_lora_serving(self.model.lora, self.sampling)
        # Refused here, before Ray starts, as `iterft run` refuses them: not as a rank's remote traceback.
        args = {**(args or {})}
        output_dir = args.pop("output_dir", "runs/trainer")
        self._trainer_args = {"output_dir": output_dir, "report_to": "none", **check_trainer_args(args)}
        check_model_sources(self.model)
        filters = filters if filters is not None else []
        reward_models = reward_models_of(filters)  # a bad spec fails here, before Ray starts
        requests = run_requests(self.model, self.sampling, self.resources, filters, env is not None)
        init_ray()
        self._requests = {q.role: q for q in check_cluster_fits(requests)}
        # Generators and filters are asked for first: creating the trainer waits for its
        # placement group, and on an autoscaling cluster their nodes can start meanwhile.
        self.env_pool = EnvPool(env, self.resources.num_env_workers, self._restartable("env actor")) if env else None
        env_run = None if env is None else EnvRun(env, self.env_pool.actors, self._trainer_args.get("max_length"),
                                                  system_prompt)
        self.generators = GeneratorPool(self.model, self.sampling, self._restartable("generator"), env_run)
        self.filter_pool: FilterPool | None = None
        self.reward_pool: RewardModelPool | None = None
        self.trainer: TrainerGroup | None = None
        self.weight_sync: WeightSync | None = None
        try:
            start = Deadline.after(self.resources.start_timeout_s, "resources.start_timeout_s")
            self.generators.scale(self.resources.num_generators)
            # Reward-model actors load their weights once, at start; a restarted one loads them again.
            self.reward_pool = RewardModelPool(reward_models, self.resources.num_reward_models,
                                               self._restartable("reward model"))
            self.filter_pool = FilterPool(filters, self.resources.filter_pool_size, filter_timeout_s,
                                          self._restartable("filter actor"), rewards=self.reward_pool.client(),
                                          min_env_score=env.min_score if env else 1.0)
            self.trainer = self._new_trainer(checkpoint, start)
            end_idle_actors()  # warm actors this trainer did not take (`keep_actors_warm`) would hold resources
            self._wait_started(start)
            self.weight_sync = WeightSync(self.trainer, self.generators, self.resources, self.actor_roster)
            self.eos_token: str | None = self.trainer.call(TrainerRank.eos_token, on="rank0")[0]
        except BaseException:
            self.shutdown()  # a failed start leaves no actor behind
            raise

    @property
    def version(self) -> int:
        """The newest weight version published to the generators."""
        return self.weight_sync.version

    @property
    def weights(self) -> ray.ObjectRef:
        """The snapshot reference of `version`."""
        return self.weight_sync.snapshot

    def _new_trainer(self, checkpoint: StoragePath | str | None, start: Deadline) -> TrainerGroup:
        """The trainer's ranks, their placement group placed by the `start` deadline (else PlacementError)."""
        try:
            return TrainerGroup(self.model, self._trainer_args, self.resources, checkpoint,
                                placement_timeout_s=start.remaining(),
                                memory=self._requests["trainer rank"].bundle.get("memory", 0))
        except ray.exceptions.GetTimeoutError:
            bundle = format_resources(self._requests["trainer rank"].bundle)
            waiting = [f"trainer ranks 0..{self.resources.trainer_ranks - 1} (one placement group) asking for "
                       f"{bundle} each"]
            raise placement_timeout(start, waiting + not_started(self._other_actors()),
                                    list(self._requests.values())) from None

    def _other_actors(self) -> list[tuple[str, Any, dict[str, float]]]:
        """(name, handle, request) of every generator, filter actor and reward-model actor."""
        generator, filter_actor = self._requests["generator"].bundle, self._requests["filter actor"].bundle
        actors = [(f"generator {i}", g, generator) for i, g in enumerate(self.generators.actors)]
        pool = self.filter_pool.actors if self.filter_pool is not None else []
        rewards = self.reward_pool.actors if self.reward_pool is not None else []
        envs = self.env_pool.actors if self.env_pool is not None else []
        return (actors + [(f"filter actor {i}", a, filter_actor) for i, a in enumerate(pool)]
                + [(f"reward model {i}", a, self._requests["reward model"].bundle) for i, a in enumerate(rewards)]
                + [(f"env actor {i}", a, self._requests["env actor"].bundle) for i, a in enumerate(envs)])

    def _wait_started(self, start: Deadline) -> None:
        """Every generator, filter actor and reward-model actor placed and constructed, by the `start` deadline."""
        wait_started(self._other_actors(), start, self.actor_roster(), list(self._requests.values()))

    def _restartable(self, role: str) -> dict[str, Any]:
        """Actor options of a `role`'s actors: its resources, and restarts and retries within the run's limits.

        A generator that dies is restarted and its unfinished call retried: sampling is
        seeded per call, so the retry yields the same rows, no sample lost or doubled.
        """
        return {**actor_options(self._requests[role].bundle), "max_restarts": self.resources.max_restarts,
                "max_task_retries": self.resources.max_task_retries}

    def actor_roster(self) -> ActorRoster:
        """How errors name this trainer's actors (`generator 0`, `filter actor 1`, `trainer rank 0`)."""
        return roster_of({"generator": self.generators.actors,
                          "filter actor": self.filter_pool.actors if self.filter_pool is not None else [],
                          "reward model": self.reward_pool.actors if self.reward_pool is not None else [],
                          "env actor": self.env_pool.actors if self.env_pool is not None else [],
                          "trainer rank": self.trainer.ranks if self.trainer is not None else []}, self.resources)

    def restore_trainer(self, checkpoint: StoragePath | str) -> dict[str, Any]:
        """Replace the trainer (dead or alive) by one restored from `checkpoint`; generators load its weights,
        under a version newer than any published before.

        Returns the `extra` state saved with the checkpoint.
        """
        self.trainer.shutdown()
        self.trainer = self._new_trainer(checkpoint, Deadline.after(self.resources.start_timeout_s,
                                                                    "resources.start_timeout_s"))
        self.weight_sync.trainer_replaced(self.trainer)
        return self.trainer.restored

    def trainer_alive(self, timeout_s: float = 30) -> bool:
        """Whether every trainer rank still answers (a rank that died, or hangs past `timeout_s`, does not)."""
        try:
            self.trainer.version(timeout_s)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def scale_generators(self, count: int) -> None:
        """Grow or shrink the generator pool; new generators load the current weights before they sample."""
        if self.generators.scale(count):
            self.weight_sync.generators_changed()

    def generate(
        self,
        prompts: pa.Table | list[str] | list[dict],
        *,
        seed: int = 0,
        round_index: int = 0,
        **sampling: Any,
    ) -> list[ray.ObjectRef]:
        """Shard prompts across generators and sample with the current weights; returns rollout references.

        `sampling` overrides fields of the SamplingConfig (num_samples, temperature, ...).
        """
        if "engine" in sampling:
            raise ValueError("engine: fixed when the generators start (sampling.engine), not per call")
        config = dataclasses.replace(self.sampling, **sampling)
        return self.generators.generate(prompt_table(prompts), self.weights, self.version, config, seed, round_index)

    def filter(self, rollouts: list[ray.ObjectRef], filters: list | None = None) -> ScoredRollouts:
        """Score rollout batches in the filter pool (as soon as each is ready); returns references.

        `filters` may name only the reward models the trainer was built with: their actors start with it."""
        pairs = [self.filter_pool.score(ref, filters) for ref in rollouts]
        return ScoredRollouts([p[0] for p in pairs], [p[1] for p in pairs])

    def step(self, rollouts: ScoredRollouts | list[ray.ObjectRef] | None = None, deadline: Deadline | None = None,
             *, restart_from: StoragePath | str | None = None, epochs: int = 1, train_turns: str = "all",
             updates: int | None = None, **kwargs: Any) -> dict:
        """Train: on the accepted rows of scored rollouts, or with `IterativeSFTTrainer.step`'s arguments.

        Training on rollouts stops at `deadline` with `RoundTimeoutError` naming the ranks still
        at work; it makes `epochs` passes (or exactly `updates` updates), after restarting from the weights
        saved in `restart_from` if given (`TrainerRank.step_rollouts`). The statistics carry the weight
        `version` the step made.
        """
        if rollouts is not None:
            if kwargs:
                raise ValueError("rollouts: give rollouts or step() arguments, not both")
            refs = self.step_async(rollouts, restart_from=restart_from, epochs=epochs, train_turns=train_turns,
                                   updates=updates)
            try:
                return self.trainer.gather(refs, None if deadline is None else deadline.remaining())[0]
            except ray.exceptions.GetTimeoutError:
                _, pending = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
                raise round_timeout(pending, deadline, "train", self.actor_roster()) from None
        return self.trainer.step(**kwargs)

    def step_async(self, rollouts: ScoredRollouts | list[ray.ObjectRef], *,
                   restart_from: StoragePath | str | None = None, epochs: int = 1,
                   train_turns: str = "all", updates: int | None = None) -> list[ray.ObjectRef]:
        """Start training on scored rollouts, passed by reference to every rank; returns one reference
        per rank (`trainer.gather(refs)[0]` is the statistics, and raises any rank's failure)."""
        tables = rollouts.tables if isinstance(rollouts, ScoredRollouts) else list(rollouts)
        return self.trainer.call_async(TrainerRank.step_rollouts, *tables, restart_from=restart_from, epochs=epochs,
                                       train_turns=train_turns, updates=updates)

    def sync_weights(self, version: int | None = None, deadline: Deadline | None = None) -> int:
        """Publish the trainer's weights once and have every generator load them (by `deadline`); returns the
        version. `version`: the trainer's current version when the caller knows it (a step's statistics)."""
        return self.weight_sync.sync(version, deadline)

    def publish_weights(self, version: int | None = None) -> int:
        """Put the trainer's current weights in the object store (generators load them on their next call)."""
        return self.weight_sync.publish(version)

    def collect(self, refs: ScoredRollouts | list[ray.ObjectRef]) -> pa.Table:
        """Fetch rollout batches into one table, for looking at them in a notebook."""
        tables = refs.tables if isinstance(refs, ScoredRollouts) else refs
        return pa.concat_tables(ray.get(list(tables)))

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Save a checkpoint: Hugging Face model + tokenizer + training state (+ `extra` JSON), atomically."""
        self.trainer.save(path, extra)

    def shutdown(self) -> None:
        """Stop every actor this trainer started (those that did start, when it failed while starting)."""
        self.generators.shutdown()
        if self.filter_pool is not None:
            self.filter_pool.shutdown()
        if self.reward_pool is not None:
            self.reward_pool.shutdown()
        if self.env_pool is not None:
            self.env_pool.shutdown()
        if self.trainer is not None:
            self.trainer.shutdown()
