"""`python_tool`: the model writes code in a fenced block, the sandbox runs it, its output comes back.

A turn with a ```python block runs that block afresh in the sandbox (`iterft_ray.verify.sandbox`,
the limits `python_tests` takes: `env.config.wall_s`, `cpu_s`, `memory_mb`, `processes`,
`output_bytes`, `scratch_mb`), and its stdout and stderr, cut at `env.config.max_output_chars`
(1000), come back as a `tool` message. A turn without a block is the final answer, graded by
`math_answer` against the row's `answer`: reward 1 when right, else 0.
"""

from __future__ import annotations

from typing import Any

from iterft_ray.envs.protocol import StepOutput, TextEnv
from iterft_ray.verify.sandbox import SandboxLimits, run_python
from iterft_ray.verify.verifiers import CODE_BLOCK, math_answer

_LIMIT_KEYS = ("wall_s", "cpu_s", "memory_mb", "processes", "output_bytes", "scratch_mb")


class PythonToolEnv(TextEnv):
    def __init__(self, env_config: dict[str, Any] | None = None, extras: dict[str, Any] | None = None):
        super().__init__(env_config, extras)
        self.limits = SandboxLimits(**{k: self.env_config[k] for k in _LIMIT_KEYS if k in self.env_config})
        self.max_output_chars = int(self.env_config.get("max_output_chars", 1000))
        self.runs = 0

    def step(self, action: str) -> StepOutput:
        self.turns += 1
        blocks = CODE_BLOCK.findall(action)
        if not blocks:
            correct = bool(math_answer()("", action, self.extras).value)
            return {"observations": [], "reward": 1.0 if correct else 0.0, "done": True, "metadata": {}}
        self.runs += 1
        result = run_python(blocks[-1], self.limits)
        output = result.output if len(result.output) <= self.max_output_chars else (
            result.output[: self.max_output_chars] + "\n[output cut]")
        if result.killed:
            output += f"\n[killed: {result.killed}]"
        return {"observations": [{"role": "tool", "content": output}], "reward": 0.0, "done": False, "metadata": {}}

    def get_metrics(self) -> dict[str, Any]:
        return {"code_runs": self.runs}
