"""The environments tests name by import string (`"toy_envs:CountdownEnv"`); standard library only, as an
environment actor's zygote imports this module (see tests/toy_filters.py for why that matters).

None of them subclasses anything: the protocol is duck-typed, as SkyRL-gym's is.
"""

import time


class CountdownEnv:
    """Deterministic: after each turn says how many are left, until the row's `max_turns`; the last turn earns
    `env_config["reward"]` (1.0). Its observations are text the model never wrote."""

    def __init__(self, env_config, extras):
        self.max_turns = int(extras["max_turns"])
        self.reward = float(env_config.get("reward", 1.0))
        self.step_seconds = float(env_config.get("step_seconds", 0.0))  # a slow simulator, where a test needs one
        self.turns = 0

    def init(self, prompt):
        return prompt, {}

    def step(self, action):
        time.sleep(self.step_seconds)
        self.turns += 1
        done = self.turns >= self.max_turns
        observations = [] if done else [{"role": "user", "content": f"left: {self.max_turns - self.turns}"}]
        return {"observations": observations, "reward": self.reward if done else 0.0, "done": done,
                "metadata": {}, "postprocessed_action": action.strip()}

    def get_metrics(self):
        return {"countdown_turns": self.turns}

    def close(self):
        pass


class FaultyEnv(CountdownEnv):
    """Prompt ids 0 mod 3 raise in `step`, 1 mod 3 hang in `step`, the rest count down."""

    def __init__(self, env_config, extras):
        super().__init__(env_config, extras)
        self.kind = extras["prompt_id"] % 3

    def step(self, action):
        if self.kind == 0:
            raise RuntimeError("the simulator crashed")
        if self.kind == 1:
            time.sleep(3600)
        return super().step(action)


class NoStep:
    def __init__(self, env_config, extras):
        pass
