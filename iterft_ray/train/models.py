"""How a model loads: the Auto class its config names, with its weights or on the meta device.

Apart from `trainer.py` because generators load models too, and `trainer.py` imports transformers'
`Trainer`, which brings peft, datasets and accelerate: 0.7 s of CPU at every generator's start.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel


def load_model(name_or_path: str, **kwargs) -> PreTrainedModel:
    """Load a causal or seq2seq LM with the Auto class its config calls for."""
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    return _auto_class(config).from_pretrained(name_or_path, config=config, **kwargs)


def empty_model(name_or_path: str, **kwargs) -> PreTrainedModel:
    """The model `load_model` would load, built on the meta device: shapes and dtypes, no storage.

    A sharded rank other than 0 starts from it, so it never holds the whole model: `shard_model`
    gives it storage for its own shards and fills them from rank 0.
    """
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    with torch.device("meta"):
        return _auto_class(config).from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))


def _auto_class(config) -> type:
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
