"""The trajectory runner: a generator's prompts become trajectories, sampled turn by turn, token-exact.

A trajectory is a small state machine:

    OPEN   -> its environment's `init` (in an environment actor's process) gives the prompt messages
    SAMPLE -> the engine samples an assistant turn from the ids so far (`Engine.generate_ids`)
    STEP   -> the environment's `step` reads the turn's text; its observations are rendered with the chat
              template and appended as ids (mask 0), then SAMPLE again, until `done`, `env.max_turns`,
              the context budget, or an error
    DONE   -> its environment is closed; its metrics come back

The sampled ids are appended exactly as sampled (mask 1, the end-of-turn token included) and never
re-tokenized. Trajectories advance in `env.groups` fixed groups, in a fixed order: while one group's
environments step, the engine samples the next group's turns. Each (trajectory, turn) has its own seed,
and a group's sampling call holds the same trajectories whatever the timing, so a deterministic
environment gives the same trajectories again. Nothing here imports Ray but `ray.get` on the
environment actors' replies.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from iterft_ray.config import EnvConfig, SamplingConfig
from iterft_ray.data.chat import conversation
from iterft_ray.data.rollouts import CALL_COLUMNS, RolloutBatch, rollout_table
from iterft_ray.data.slices import split
from iterft_ray.engines.base import Engine
from iterft_ray.engines.seeding import turn_seed
from iterft_ray.envs.hosts import Reply
from iterft_ray.envs.protocol import BUILTIN_ENVS, SKYRL_PREFIX
from iterft_ray.envs.turns import TurnTemplate

# How often a trajectory runs again from its start after its environment actor died, before it ends with `env_error`.
MAX_TRAJECTORY_RESTARTS = 3
# Prompt-table columns that are not the environment's extras.
_NOT_EXTRAS = ("prompt", "prompt_ids", "messages", "env_class", *CALL_COLUMNS)


@dataclass
class EnvRun:
    """What a generator needs to run trajectories: the `env:` section, the environment actors, and the
    parts of the context budget that are not the engine's (`trainer.max_length`) and the system prompt."""

    config: EnvConfig
    actors: list
    max_length: int | None = None
    system_prompt: str | None = None


class State(enum.Enum):
    OPEN = "open"
    SAMPLE = "sample"
    STEP = "step"
    DONE = "done"


@dataclass
class Trajectory:
    index: int  # in the call: prompt_index * n + sample
    key: str
    actor: Any
    messages: list[dict[str, Any]]
    state: State = State.OPEN
    pending: Any = None  # the reference of the environment call in flight
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprob_sum: float = 0.0
    turns: int = 0
    open_turn: bool = False  # the last turn was cut before its end-of-turn token
    finished: bool = False
    truncated: bool = False
    error: str | None = None
    step_rewards: list[float] = field(default_factory=list)
    env_seconds: float = 0.0
    last_action: str = ""
    closing: Any = None
    opening: tuple = ()  # (env name, extras, prompt messages): what `open` is called with, again after a restart
    restarts: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.ids)


def run_trajectories(engine: Engine, prompts: pa.Table, run: EnvRun, sampling: SamplingConfig, seed: int,
                     weight_version: int, generator_id: int, round_index: int) -> RolloutBatch:
    """Run `sampling.num_samples` trajectories per prompt row (one when greedy), `sampling.batch_size` at a time;
    returns their rollout batch."""
    env = run.config
    template = TurnTemplate(engine.tokenizer, engine.stops)
    budget = min([b for b in (engine.max_model_len, run.max_length) if b] or [1 << 30])
    n = 1 if sampling.temperature == 0 else sampling.num_samples
    rows = prompts.to_pylist()
    call = uuid.uuid4().hex[:12]

    def new(index: int, row: dict) -> Trajectory:  # each keeps one environment actor for all its turns
        return Trajectory(index, f"{call}-{index}", run.actors[(generator_id + index) % len(run.actors)],
                          row.get("messages") or conversation(row["prompt"], run.system_prompt))

    trajectories = [new(p * n + s, row) for p, row in enumerate(rows) for s in range(n)]
    # At most `sampling.batch_size` trajectories in flight: each holds an environment process while it runs.
    for start in range(0, len(trajectories), sampling.batch_size):
        chunk = trajectories[start:start + sampling.batch_size]
        for t in chunk:
            row = rows[t.index // n]
            extras = {k: v for k, v in row.items() if k not in _NOT_EXTRAS}
            extras.setdefault("max_turns", env.max_turns)
            t.opening = (_env_name(row.get("env_class"), env.name), extras, t.messages)
            _open(t)
        groups = [g for g in split(chunk, env.groups) if g]
        while any(t.state is not State.DONE for t in chunk):
            for group in groups:
                live = [t for t in group if t.state is not State.DONE]
                if not live:
                    continue
                for t in live:
                    reply = _reply(t.pending)
                    if reply.lost and t.restarts < MAX_TRAJECTORY_RESTARTS:
                        _restart(t)  # its environment actor died: the trajectory runs again from its start
                    else:
                        _take_reply(t, reply, template, env, budget)
                _sample_turns([t for t in live if t.state is State.SAMPLE], engine, sampling, seed, budget)
        ray.wait([t.closing for t in chunk], num_returns=len(chunk), fetch_local=False)
    metrics = [_reply(t.closing, closing=True) for t in trajectories]
    return _trajectory_table(prompts, trajectories, metrics, n, engine.tokenizer, weight_version, generator_id,
                             round_index, seed)


def _open(t: Trajectory) -> None:
    name, extras, messages = t.opening
    t.pending = t.actor.open.remote(t.key, name, extras, messages)


def _reply(ref: Any, closing: bool = False) -> Reply:
    """An environment call's reply; an actor that died under it (or restarted: Ray retries the call there) is a
    lost environment. A close that finds its environment lost is no error: the trajectory was done, only its
    metrics are gone."""
    try:
        reply = ray.get(ref)
    except ray.exceptions.RayActorError:
        reply = Reply(False, "the environment actor died", 0.0, True)
    return Reply(True, {}, reply.seconds) if closing and reply.lost else reply


def _restart(t: Trajectory) -> None:
    """Run `t` again from its start on its (restarted) environment actor: with its own seeds per turn, a
    deterministic environment and the vllm engine it samples the same turns."""
    fresh = Trajectory(t.index, t.key, t.actor, t.opening[2], opening=t.opening, restarts=t.restarts + 1)
    t.__dict__.update(fresh.__dict__)
    _open(t)


def _env_name(env_class: str | None, default: str) -> str:
    """A row's `env_class` (SkyRL's column) as an `env.name`: a bare id is SkyRL-gym's when `env.name` is."""
    if not env_class:
        return default
    if ":" in env_class or env_class in BUILTIN_ENVS or not default.startswith(SKYRL_PREFIX):
        return env_class
    return SKYRL_PREFIX + env_class


def _take_reply(t: Trajectory, reply: Reply, template: TurnTemplate, env: EnvConfig, budget: int) -> None:
    """Advance `t` by its environment's reply to `open` or `step`."""
    t.env_seconds += reply.seconds
    if not reply.ok:
        t.error = str(reply.value)
        return _close(t)
    if t.state is State.OPEN:
        t.messages = reply.value
        t.prompt_ids = template.prompt_ids(t.messages)
        t.state = State.SAMPLE
        if t.length >= budget:
            t.truncated = True
            _close(t)
        return
    out = reply.value
    t.step_rewards.append(out["reward"])
    if out["postprocessed_action"] is not None:
        t.messages[-1]["postprocessed_action"] = out["postprocessed_action"]
    if out["done"]:
        t.finished = True
        return _close(t)
    if t.turns >= env.max_turns:
        return _close(t)
    following = ([template.end_of_turn] if t.open_turn else []) + template.observation_ids(out["observations"])
    t.messages.extend(out["observations"])
    if t.length + len(following) >= budget:  # no room left for a token of the next turn
        t.truncated = True
        return _close(t)
    t.ids += following
    t.mask += [0] * len(following)
    t.state = State.SAMPLE


def _sample_turns(ready: list[Trajectory], engine: Engine, sampling: SamplingConfig, seed: int, budget: int) -> None:
    """Sample the next assistant turn of each of `ready` in one engine call, then send each to its environment."""
    if not ready:
        return
    sampled = engine.generate_ids([t.prompt_ids + t.ids for t in ready], sampling,
                                  [turn_seed(seed, t.index, t.turns) for t in ready],
                                  [min(sampling.max_new_tokens, budget - t.length) for t in ready])
    for t, turn in zip(ready, sampled):
        t.ids += turn.ids
        t.mask += [1] * len(turn.ids)
        t.logprob_sum += turn.logprob_sum
        t.turns += 1
        t.open_turn = not turn.finished
        t.last_action = engine.tokenizer.decode(turn.ids, skip_special_tokens=True)
        t.messages.append({"role": "assistant", "content": t.last_action})
        if t.open_turn and t.length >= budget:  # cut by the context budget, not by max_new_tokens
            t.truncated = True
            _close(t)
            continue
        t.state = State.STEP
        t.pending = t.actor.step.remote(t.key, t.last_action)


def _close(t: Trajectory) -> None:
    t.state = State.DONE
    t.pending = None
    t.closing = t.actor.close.remote(t.key)


def _trajectory_table(prompts: pa.Table, trajectories: list[Trajectory], closed: list[Reply], n: int, tokenizer,
                      weight_version: int, generator_id: int, round_index: int, seed: int) -> RolloutBatch:
    samples: dict[str, list] = {
        "prompt_index": [t.index // n for t in trajectories],
        "sample": [t.index % n for t in trajectories],
        "prompt_ids": [t.prompt_ids for t in trajectories],
        "completion_ids": [t.ids for t in trajectories],
        "completion_mask": [t.mask for t in trajectories],
        "completion": [t.last_action for t in trajectories],
        "finished": [t.finished for t in trajectories],
        "logprob_sum": [t.logprob_sum for t in trajectories],
        "turns": [t.turns for t in trajectories],
        "truncated": [t.truncated for t in trajectories],
        "messages": [json.dumps(t.messages) for t in trajectories],
        "step_rewards": [t.step_rewards for t in trajectories],
        "env_reward": [sum(t.step_rewards) for t in trajectories],
        "env_metrics": [json.dumps(c.value if c.ok else {}) for c in closed],
        "env_error": [t.error if t.error is not None or c.ok else str(c.value) for t, c in zip(trajectories, closed)],
        "env_seconds": [t.env_seconds + c.seconds for t, c in zip(trajectories, closed)],
        "env_name": [t.opening[0] for t in trajectories],
    }
    return rollout_table(prompts, tokenizer, None, samples, weight_version, generator_id, round_index, seed)
