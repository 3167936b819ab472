"""iterft_ray: iterative fine-tuning of language models on Ray."""

from .trainer import IterativeSFTConfig, IterativeSFTTrainer

__all__ = ["IterativeLoop", "IterativeSFTConfig", "IterativeSFTTrainer", "RayIterativeSFTTrainer", "load_config"]


def __getattr__(name: str):
    # The Ray side loads on first use, so the local trainer does not import Ray.
    if name == "IterativeLoop":
        from .driver import IterativeLoop

        return IterativeLoop
    if name == "RayIterativeSFTTrainer":
        from .ray_trainer import RayIterativeSFTTrainer

        return RayIterativeSFTTrainer
    if name == "load_config":
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'iterft_ray' has no attribute {name!r}")
