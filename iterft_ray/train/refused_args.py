"""The `TrainingArguments` this trainer refuses, and why, for the trainer and `load_config` alike.

`step()` never runs `Trainer.train()`, where accelerate would act on the parallelism keys,
and the ranks are sharded with FSDP2 by the trainer group (`resources.trainer_ranks`).
`ddp_backend` and `ddp_timeout` are honoured there (the process group's backend and timeout).
"""

from __future__ import annotations

from typing import Any

from transformers.utils import is_liger_kernel_available

REFUSED_ARGS = {
    "fsdp": "ranks are sharded with FSDP2 by setting resources.trainer_ranks",
    "fsdp_config": "ranks are sharded with FSDP2 by setting resources.trainer_ranks",
    "deepspeed": "DeepSpeed is not supported; ranks are sharded with FSDP2 (resources.trainer_ranks)",
    "parallelism_config": "ranks are sharded with FSDP2 by setting resources.trainer_ranks",
    "ddp_find_unused_parameters": "ranks are not wrapped in DDP (they are sharded with FSDP2)",
    "ddp_bucket_cap_mb": "ranks are not wrapped in DDP (they are sharded with FSDP2)",
    "ddp_broadcast_buffers": "ranks are not wrapped in DDP (they are sharded with FSDP2)",
    "ddp_static_graph": "ranks are not wrapped in DDP (they are sharded with FSDP2)",
}


def refused_arg(key: str, value: Any) -> str | None:
    """Why `trainer.<key>: value` cannot take effect here, or None when it can."""
    if key in REFUSED_ARGS and value not in (None, "", [], {}):  # every one of them defaults to unset
        return f"trainer.{key}: not supported ({REFUSED_ARGS[key]}); got {value!r}"
    if key == "use_liger_kernel" and value and not is_liger_kernel_available():
        return "trainer.use_liger_kernel: liger-kernel is not installed (pip install liger-kernel)"
    return None
