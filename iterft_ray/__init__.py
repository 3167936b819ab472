"""iterft_ray: iterative fine-tuning of language models on Ray."""

from .trainer import IterativeSFTConfig, IterativeSFTTrainer

__all__ = ["IterativeSFTConfig", "IterativeSFTTrainer"]
