"""`retry`: the row's single-turn checker, with another try after a wrong answer, up to `max_turns`.

Each turn is an answer, graded by a row filter (`env.config.filter`, a filter spec as `filters:` takes
them; default `exact_answer`) on (prompt, answer, the row's columns). Right: reward 1, done. Wrong: reward
0 and `env.config.feedback` ("wrong, try again") as the user's next message.
"""

from __future__ import annotations

from typing import Any

from iterft_ray.envs.protocol import Messages, StepOutput, TextEnv
from iterft_ray.verify.filters import resolve_filter
from iterft_ray.verify.verdict import Verdict


class RetryEnv(TextEnv):
    def __init__(self, env_config: dict[str, Any] | None = None, extras: dict[str, Any] | None = None):
        super().__init__(env_config, extras)
        self.check = resolve_filter(self.env_config.get("filter", "exact_answer"))
        self.feedback = str(self.env_config.get("feedback", "wrong, try again"))
        self.prompt = ""

    def init(self, prompt: Messages) -> tuple[Messages, dict[str, Any]]:
        self.prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
        return prompt, {}

    def step(self, action: str) -> StepOutput:
        self.turns += 1
        verdict = self.check(self.prompt, action, self.extras)
        correct = bool(verdict.value if isinstance(verdict, Verdict) else verdict)
        done = correct or self.turns >= self.max_turns
        observations = [] if done else [{"role": "user", "content": self.feedback}]
        return {"observations": observations, "reward": 1.0 if correct else 0.0, "done": done, "metadata": {}}

    def get_metrics(self) -> dict[str, Any]:
        return {"tries": self.turns}
