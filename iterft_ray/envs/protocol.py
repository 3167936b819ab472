"""The environment protocol: SkyRL-gym's text environment, duck-typed, and how `env.name` becomes one.

An environment is text in, text out, and knows no model, tokenizer or Ray:

    env = Env(env_config, extras)          # extras: the prompt row's other columns (+ max_turns)
    prompt, metadata = env.init(prompt)    # prompt: chat messages
    out = env.step(action)                 # {"observations": [messages], "reward", "done", "metadata",
                                           #  "postprocessed_action" (optional)}
    env.get_metrics()                      # optional: a dict of this trajectory's numbers
    env.close()

so a class written for SkyRL-gym (`skyrl_gym.envs.base_text_env.BaseTextEnv`) runs unchanged, and
`TextEnv` here gives the same methods to users without skyrl-gym. The trajectory runner
(`iterft_ray.envs.runner`) owns the tokens and the loss mask; `iterft_ray.envs.hosts` runs an
environment in a process of its own.
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any, Callable, TypedDict

Messages = list[dict[str, Any]]

# The built-in environments (`env.name: calculator`), each a module of this package.
BUILTIN_ENVS = {
    "calculator": "iterft_ray.envs.calculator:CalculatorEnv",
    "retry": "iterft_ray.envs.retry:RetryEnv",
    "python_tool": "iterft_ray.envs.python_tool:PythonToolEnv",
}
SKYRL_PREFIX = "skyrl_gym:"


class StepOutput(TypedDict, total=False):
    """What `step` returns (SkyRL-gym's `BaseTextEnvStepOutput`)."""

    observations: Messages
    reward: float
    done: bool
    metadata: dict[str, Any]
    postprocessed_action: str | None


class TextEnv:
    """A base class with SkyRL-gym's `BaseTextEnv` methods, for environments written without skyrl-gym.

    `self.max_turns` comes from the row's `max_turns` extra (`env.max_turns` where the row has none);
    `self.turns` counts the steps taken, as SkyRL-gym's does when a subclass increments it.
    """

    def __init__(self, env_config: dict[str, Any] | None = None, extras: dict[str, Any] | None = None):
        self.env_config = dict(env_config or {})
        self.extras = dict(extras or {})
        self.turns = 0
        self.max_turns = int(self.extras.get("max_turns", 1))

    def init(self, prompt: Messages) -> tuple[Messages, dict[str, Any]]:
        return prompt, {}

    def step(self, action: str) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__}.step")

    def close(self) -> None:
        pass

    def get_metrics(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def aggregate_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """The mean of each numeric metric over trajectories (SkyRL-gym's default)."""
        return mean_metrics(metrics)


def mean_metrics(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """The mean of each numeric (non-bool) value over the dicts that have it."""
    sums: dict[str, list[float]] = {}
    for m in metrics:
        for key, value in m.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                sums.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in sums.items()}


EnvFactory = Callable[[dict[str, Any], dict[str, Any]], Any]


def resolve_env(name: str) -> EnvFactory:
    """The factory `(env_config, extras) -> environment` that `name` means.

    `skyrl_gym:<id>` is looked up in SkyRL-gym's registry (and made by `skyrl_gym.make`) before anything
    else is imported; a built-in name is one of `BUILTIN_ENVS`; anything else is `package.module:Class`.
    Raises ValueError saying which of these `name` failed to be.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"expected an environment name, got {name!r}")
    if name.startswith(SKYRL_PREFIX):
        return _skyrl_factory(name[len(SKYRL_PREFIX):])
    cls = _env_class(name)
    return lambda env_config, extras: cls(env_config, extras)


def aggregate_metrics(name: str, metrics: list[dict[str, Any]]) -> dict[str, float]:
    """A round's number for each metric of environment `name`'s trajectories: its class's own static
    `aggregate_metrics` (SkyRL-gym's, as `skyrl_gym.metrics.aggregate_for_environment` calls it), the mean of
    each number where the class has none. Only numbers are kept: trackers log them."""
    if name.startswith(SKYRL_PREFIX):
        from skyrl_gym.metrics import aggregate_for_environment

        out = aggregate_for_environment(name[len(SKYRL_PREFIX):], metrics)
    else:
        aggregate = getattr(_env_class(name), "aggregate_metrics", None)
        out = aggregate(metrics) if callable(aggregate) else mean_metrics(metrics)
    return {k: float(v) for k, v in (out or {}).items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _env_class(name: str) -> type:
    target = BUILTIN_ENVS.get(name, name)
    if ":" not in target:
        raise ValueError(f"{name!r} is not a built-in environment {sorted(BUILTIN_ENVS)}, an import string "
                         f"'package.module:Class' or '{SKYRL_PREFIX}<id>'")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{name!r}: cannot import {module_name}: {e}") from None
    cls = getattr(module, attribute, None)
    if cls is None:
        raise ValueError(f"{name!r}: module {module_name} has no {attribute!r}")
    if not callable(cls) or not callable(getattr(cls, "step", None)):
        raise ValueError(f"{name!r}: {attribute} is not an environment class (it has no step method)")
    return cls


def _skyrl_factory(env_id: str) -> EnvFactory:
    try:
        import skyrl_gym
    except ImportError:
        raise ValueError(f"'{SKYRL_PREFIX}{env_id}' needs skyrl-gym; pip install 'iterft_ray[skyrl]'") from None
    if env_id not in skyrl_gym.registry:
        raise ValueError(f"'{SKYRL_PREFIX}{env_id}': SkyRL-gym has no environment {env_id!r} "
                         f"(registered: {sorted(skyrl_gym.registry)})")
    return lambda env_config, extras: skyrl_gym.make(env_id, env_config=env_config, extras=extras)


def checked_step(output: Any) -> StepOutput:
    """A `step` result as plain data, or TypeError naming what is wrong with it (it ends the trajectory)."""
    if not isinstance(output, dict):
        raise TypeError(f"step returned {type(output).__name__}, expected a dict with observations, reward, done")
    observations = output.get("observations") or []
    if not isinstance(observations, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in observations):
        raise TypeError(f"step's observations: expected a list of {{role, content}} messages, got {observations!r}")
    reward = output.get("reward")
    reward = 0.0 if reward is None else reward
    if not isinstance(reward, numbers.Real) or isinstance(reward, bool):
        raise TypeError(f"step's reward: expected a number, got {reward!r}")
    action = output.get("postprocessed_action")
    return {"observations": [{"role": m["role"], "content": m["content"]} for m in observations],
            "reward": float(reward), "done": bool(output.get("done")),
            "metadata": dict(output.get("metadata") or {}),
            "postprocessed_action": None if action is None else str(action)}


def checked_init(result: Any, prompt: Messages) -> Messages:
    """The prompt messages `init` returned (SkyRL-gym: `(prompt, metadata)`), or TypeError."""
    messages = result[0] if isinstance(result, tuple) else result
    if messages is None:
        return prompt
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise TypeError(f"init: expected (messages, metadata), got {result!r}")
    return [dict(m) for m in messages]
