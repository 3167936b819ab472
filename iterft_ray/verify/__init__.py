"""verify: filters and selectors, the processes that run them, verifiers, the sandbox."""

from iterft_ray.verify.verdict import Verdict

__all__ = ["Verdict"]
