"""Multi-turn environments: the protocol (SkyRL-gym's text environment, duck-typed; no Ray), the built-in
environments, and the trajectory runner a generator drives. `TextEnv` is the base class a user's environment
may subclass (it need not: any class with the same methods runs)."""

from iterft_ray.envs.protocol import StepOutput, TextEnv

__all__ = ["StepOutput", "TextEnv"]
