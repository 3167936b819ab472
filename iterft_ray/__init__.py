"""iterft_ray: iterative fine-tuning of language models on Ray."""

import importlib

# Loaded on first use: a filter actor importing iterft_ray.verify.filters pulls in neither
# torch nor transformers, and the local trainer does not import Ray.
_LAZY = {
    "IterativeSFTConfig": ".train.trainer",
    "IterativeSFTTrainer": ".train.trainer",
    "IterativeLoop": ".run.loop",
    "RayIterativeSFTTrainer": ".ray_trainer",
    "RunConfig": ".config",
    "TextEnv": ".envs.protocol",
    "keep_actors_warm": ".actors.warm",
    "load_config": ".config",
    # The errors a run stops with, for a driver script to catch.
    "ActorFailedError": ".actors.failures",
    "RoundTimeoutError": ".actors.failures",
    "PlacementError": ".actors.placement",
    "FilterErrorsError": ".run.loop",
    "PromptDataError": ".data.prompts",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'iterft_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
