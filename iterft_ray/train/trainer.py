"""IterativeSFTTrainer: `trl.IterativeSFTTrainer`'s API, trained correctly.

A `transformers.Trainer` subclass, so `evaluate()`, `save_model()`, `report_to`,
optimizers from `args.optim` and every `TrainingArguments` field work as users know
them. `step()` is ours: it runs one optimisation pass over the lists it is given
and returns statistics. Compared with TRL 0.23.1 it returns statistics instead of
None, honours `texts_labels` and caller labels (prompt masking), truncates the
sequence dimension (not the batch), trains EOS when pad == eos, keeps a constant
learning rate when there is no `max_steps`, and counts optimizer updates in
`global_step`.

With `peft_config` (or a `PeftModel`) only a LoRA adapter trains; on several ranks the
PEFT model is sharded like a full one (the frozen base included, so it is not replicated).

Nothing here knows about Ray. When `torch.distributed` is initialised with more than
one rank (a rank group made by the Ray trainer actor), the model is sharded with
FSDP2 (sharding.py): each rank holds 1/N of the parameters, gradients and optimizer
state, trains on its own shard of the batch, and FSDP2 reduce-scatters the gradients.
Master weights and optimizer state are fp32 whatever dtype the checkpoint was saved
in (a frozen LoRA base on one rank keeps its own); `bf16=True` computes in bf16. `step()`'s arguments are checked in inputs.py, the
refused `TrainingArguments` listed in refused_args.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils.memory import clear_device_cache
from peft import PeftModel, get_peft_model
from transformers.integrations.liger import apply_liger_kernel
from transformers import (
    AutoTokenizer,
    EvalPrediction,
    PreTrainedModel,
    ProgressCallback,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Trainer,
    TrainingArguments,
    get_scheduler,
)

from iterft_ray.train.batching import IGNORE_INDEX, TRUNCATION_MODES, Example, PaddingCollator, plan_micro_batches
from iterft_ray.train.inputs import step_examples
from iterft_ray.train.models import load_model
from iterft_ray.train.packing import PackingCollator, check_packed_attention
from iterft_ray.train.refused_args import REFUSED_ARGS, refused_arg
from iterft_ray.train.sharding import all_reduce_max, all_reduce_sum, shard_model, world_size

# Schedules that make sense with no known end; any other needs `max_steps`.
_OPEN_ENDED_SCHEDULES = ("linear", "constant", "constant_with_warmup")
_SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length")

@dataclass
class IterativeSFTConfig(TrainingArguments):
    """`TrainingArguments` plus the settings of `IterativeSFTTrainer`.

    Values given to the trainer's constructor win over these.
    """

    max_length: int | None = field(default=None, metadata={"help": "Longest sequence trained on, in tokens."})
    truncation_mode: str = field(default="keep_end", metadata={"help": "keep_end (drop the start) or keep_start."})
    optimize_device_cache: bool = field(default=False, metadata={"help": "Free cached device memory after each step."})
    # TRL's `padding_free` more than its `packing`: a micro-batch holds the same examples as padded,
    # so an update is the same; only the pad tokens go (packing.py).
    packing: bool = field(default=False, metadata={"help": "Pack each micro-batch's examples into rows with "
                                                           "restarting position_ids instead of padding (causal LMs)."})

    def __post_init__(self):
        super().__post_init__()
        _check_truncation(self.max_length, self.truncation_mode)

    @property
    def place_model_on_device(self) -> bool | None:
        """Sharded ranks place their own shards (`shard_model`), and a rank that starts on the meta
        device cannot be moved; otherwise `Trainer` decides as it does."""
        return False if world_size() > 1 else None


def _check_truncation(max_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode: expected one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")


def _sparse_lookup_gradient_if_tied(model: torch.nn.Module) -> None:
    """Where the input embedding is the LM head's weight and trains, have its lookup's gradient come back sparse.

    The LM head's gradient is dense and reaches the shared weight first; autograd then adds the lookup's
    rows into it in place. A dense lookup gradient would be a second vocabulary x hidden tensor beside it at
    the end of every backward pass (0.55 GB at Qwen2.5-0.5B's 151,936 x 896 in fp32): the trainer's peak.
    The weight's `.grad` stays dense, so optimizers and clipping see what they did. Not for FSDP2 shards
    (DTensor gradients) nor an untied embedding, whose only gradient would then be sparse.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (isinstance(embedding, torch.nn.Embedding) and head is not None and head.weight is embedding.weight
            and embedding.weight.requires_grad):
        embedding.sparse = True


class IterativeSFTTrainer(Trainer):
    """Supervised fine-tuning driven one `step()` at a time, for loops that sample between updates."""

    def __init__(
        self,
        model: PreTrainedModel | str | None = None,
        args: TrainingArguments | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        data_collator: Callable | None = None,
        eval_dataset: Any = None,
        max_length: int | None = None,
        truncation_mode: str | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        optimize_device_cache: bool | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list | None = None,
        peft_config: Any = None,
    ):
        if isinstance(args, (PreTrainedTokenizerBase, ProcessorMixin)):
            # TRL's documented usage, `IterativeSFTTrainer(model, tokenizer)`, puts the tokenizer where
            # `args` sits (its signature was (model, args, tokenizer)); take it as the tokenizer.
            if tokenizer is not None or processing_class is not None:
                raise ValueError("args: got a tokenizer positionally and tokenizer/processing_class too; give one")
            args, tokenizer = None, args
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise ValueError("tokenizer, processing_class: give one of them (they are the same argument)")
        tokenizer = tokenizer if tokenizer is not None else processing_class
        if isinstance(model, str):
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model)
            model = load_model(model)
        if not isinstance(model, (PreTrainedModel, PeftModel)):
            raise TypeError(f"model: expected a PreTrainedModel, a PeftModel or a path/name string, "
                            f"got {type(model).__name__}")
        if peft_config is not None and isinstance(model, PeftModel):
            raise ValueError("peft_config: the model is already a PeftModel; give one or the other")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(
                f"tokenizer (or processing_class): expected a PreTrainedTokenizerBase, got {type(tokenizer).__name__}"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        args = args if args is not None else IterativeSFTConfig(output_dir="tmp_trainer")
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args: expected TrainingArguments or IterativeSFTConfig, got {type(args).__name__}")

        for key in (*REFUSED_ARGS, "use_liger_kernel"):
            reason = refused_arg(key, getattr(args, key))
            if reason:
                raise ValueError(reason)
        if args.train_sampling_strategy not in _SAMPLING_STRATEGIES:
            raise ValueError(
                f"train_sampling_strategy: expected one of {_SAMPLING_STRATEGIES}, got {args.train_sampling_strategy!r}"
            )
        from_args = isinstance(args, IterativeSFTConfig)
        self.max_length = max_length if max_length is not None else (args.max_length if from_args else None)
        self.truncation_mode = truncation_mode or (args.truncation_mode if from_args else "keep_end")
        _check_truncation(self.max_length, self.truncation_mode)
        if optimize_device_cache is None:
            optimize_device_cache = args.optimize_device_cache if from_args else False
        self.optimize_device_cache = optimize_device_cache
        self.packing = bool(args.packing) if from_args else False
        if peft_config is not None:
            # As TRL's SFTTrainer: the base is frozen and only the adapter trains. Seeded: sharded
            # ranks must start from the same adapter (FSDP2 broadcasts nothing).
            torch.manual_seed(args.seed)
            model = get_peft_model(model, peft_config)
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        if self.packing and self.is_encoder_decoder:
            raise ValueError("trainer.packing: only for causal LMs; a seq2seq model keeps padding (set packing: false)")
        self.tokenizer = tokenizer

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or PaddingCollator(tokenizer.pad_token_id, self.is_encoder_decoder),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            callbacks=callbacks,
        )
        self._apply_train_settings()
        # Master weights in fp32 (a bf16 checkpoint loads as bf16): updates below bf16's
        # resolution must still move them, and the optimizer state follows their dtype. A frozen
        # base (LoRA) on one rank keeps its dtype: it never updates, so only the adapter needs
        # fp32 (half the memory of a bf16 base cast to fp32). FSDP2 ranks cast it too: fully_shard
        # wants one dtype per parameter group, and each rank holds 1/N of the base.
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in self.model.parameters()):
            if world_size() == 1 and not all(p.requires_grad for p in self.model.parameters()):
                for p in self.model.parameters():
                    if p.requires_grad and p.is_floating_point():
                        p.data = p.data.float()
            else:
                self.model.to(torch.float32)
        if self.packing and not next(self.model.parameters()).is_meta:
            # Before sharding, where rank 0 holds the weights (a rank started on the meta device has none
            # yet; if rank 0 refuses, the group raises its error). A forward of the sharded model here
            # changed the first update.
            check_packed_attention(self.model)
        self.sharded = world_size() > 1
        if self.sharded:
            shard_model(self.model, bf16=bool(args.bf16))
        else:
            _sparse_lookup_gradient_if_tied(self.model)
        self.create_optimizer_and_scheduler(num_training_steps=self.args.max_steps)
        if self.sharded:
            # FSDP2 owns the collectives; accelerate would wrap the sharded model in DDP.
            self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.optimizer, self.lr_scheduler)
        else:
            self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
                self.model, self.optimizer, self.lr_scheduler
            )
        self._logged_since = self._new_log_window()
        # step() is driven from outside, so a Trainer progress bar would show nothing useful;
        # the integrations in report_to (TensorBoard's writer among them) start here, as in train().
        self.remove_callback(ProgressCallback)
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)

    def _apply_train_settings(self) -> None:
        """What `Trainer.train()` does to the model before its first update, which `step()` never calls.

        Liger kernels patch the model's modules; gradient checkpointing recomputes each
        decoder layer's forward during backward instead of keeping its activations.
        """
        args = self.args
        if args.use_liger_kernel:
            apply_liger_kernel(self.model, args.liger_kernel_config)
        if args.gradient_checkpointing:
            kwargs = dict(args.gradient_checkpointing_kwargs or {})
            every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
            )

    # ---------------------------------------------------------------- schedule

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """Like `Trainer.create_scheduler`, but with no `max_steps` the rate stays constant after warm-up.

        TRL built a linear decay over 0 steps there, which trains at learning rate 0.
        """
        if self.lr_scheduler is not None or num_training_steps > 0:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.args.lr_scheduler_type not in _OPEN_ENDED_SCHEDULES:
            raise ValueError(
                f"max_steps: lr_scheduler_type={self.args.lr_scheduler_type!r} decays over a known number of "
                "updates; set max_steps, or use a constant schedule"
            )
        if 0 < self.args.warmup_steps < 1:
            raise ValueError("warmup_steps: a fraction of training needs max_steps; give a number of updates")
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup",
            optimizer=optimizer or self.optimizer,
            num_warmup_steps=int(self.args.warmup_steps),
        )
        return self.lr_scheduler

    # ---------------------------------------------------------------- step

    def step(
        self,
        input_ids: Sequence[torch.Tensor] | None = None,
        attention_mask: Sequence[torch.Tensor] | None = None,
        labels: Sequence[torch.Tensor] | None = None,
        texts: Sequence[str] | None = None,
        texts_labels: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Train on the given sequences: one optimizer update per
        `per_device_train_batch_size * gradient_accumulation_steps` of them.

        Give either lists of 1-D tensors (`input_ids`, optional `attention_mask`,
        `labels` with -100 where not to train) or lists of strings (`texts`, optional
        `texts_labels`). Returns statistics of this call; see the README.
        """
        examples = self.build_examples(input_ids, attention_mask, labels, texts, texts_labels)
        return self.train_examples(examples)

    def build_examples(self, input_ids, attention_mask, labels, texts, texts_labels) -> list[Example]:
        """Validate `step()` arguments, before anything changes, and turn them into examples.

        Apart from `train_examples` so a rank group can build the whole batch once and train
        each rank on its shard of it.
        """
        return step_examples(
            input_ids, attention_mask, labels, texts, texts_labels,
            tokenizer=self.tokenizer,
            is_encoder_decoder=self.is_encoder_decoder,
            vocab_size=self._vocab_size(),
            max_positions=self._max_positions(),
            max_length=self.max_length,
            truncation_mode=self.truncation_mode,
        )

    def _max_positions(self) -> int | None:
        config = self.accelerator.unwrap_model(self.model).config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def _vocab_size(self) -> int:
        return self.accelerator.unwrap_model(self.model).get_input_embeddings().num_embeddings

    def train_examples(self, examples: list[Example], max_updates: int | None = None) -> dict[str, float]:
        """Run the updates for already-built examples (at most `max_updates` of them) and return the call's
        statistics.

        The loss of an update is the sum of token losses over all its micro-batches
        (and all ranks) divided by that update's number of target tokens, so
        micro-batch 2 x accumulation 2 gives the same update as 4 x 1.
        """
        start = time.perf_counter()
        model = self.model
        model.train()
        plan = plan_micro_batches(
            [len(e["input_ids"]) for e in examples],
            self.args.per_device_train_batch_size,
            self.args.gradient_accumulation_steps,
            self.args.train_sampling_strategy,
            seed=self.args.seed + self.state.global_step,
        )
        # Every rank must run the same number of updates: the largest shard sets it.
        num_updates = int(all_reduce_max(torch.tensor(float(len(plan)))).item())
        plan += [[]] * (num_updates - len(plan))
        plan = plan if max_updates is None else plan[:max_updates]

        # Counts are taken on the CPU and the loss summed on the device, so the loop
        # does not wait for the accelerator until the statistics at the end.
        loss_sum = torch.zeros((), device=self.accelerator.device)
        target_tokens = input_tokens = pad_tokens = 0
        grad_norms, lr, updates = [], 0.0, 0
        for micro_batches in plan:
            batches = [self._collate([examples[i] for i in mb]) for mb in micro_batches]
            local_targets = sum(self._count_targets(b["labels"]) for b in batches)
            update_targets = all_reduce_sum(torch.tensor(float(local_targets))).item()
            if update_targets == 0:
                continue
            for batch in batches:
                tokens = batch["token_mask"] if self.packing else batch["attention_mask"]
                real = int(tokens.sum())
                input_tokens += real
                pad_tokens += tokens.numel() - real
            # Sharded ranks run the same number of forward/backward passes (each one
            # gathers parameters and reduces gradients together); a rank short of
            # micro-batches runs ones that train nothing.
            most = int(all_reduce_max(torch.tensor(float(len(batches)))).item())
            batches += [self._empty_batch()] * (most - len(batches))
            for batch in batches:
                batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
                with self.compute_loss_context_manager():
                    token_loss = self._token_loss_sum(model, batch)
                self.accelerator.backward(token_loss / update_targets)
                loss_sum += token_loss.detach()
            max_norm = self.args.max_grad_norm if self.args.max_grad_norm else math.inf
            grad_norms.append(self._clip_grad_norm(max_norm))
            lr = self.lr_scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.lr_scheduler.step()
            # No arguments: a caller who patched `optimizer.zero_grad` (TRL's tests keep
            # gradients visible with set_to_none=False) gets what they asked for.
            self.optimizer.zero_grad()
            updates += 1
            self.state.global_step += 1
            target_tokens += local_targets
            self._log_update(grad_norms[-1], lr)
        if self.optimize_device_cache:
            clear_device_cache(garbage_collection=True)

        elapsed = time.perf_counter() - start
        totals = all_reduce_sum(
            torch.tensor([loss_sum.item(), target_tokens, input_tokens, pad_tokens, len(examples)], dtype=torch.float64)
        )
        loss_sum, target_tokens, input_tokens, pad_tokens, num_sequences = totals.tolist()
        return {
            "loss": loss_sum / target_tokens if target_tokens else float("nan"),
            "grad_norm": float(torch.stack(grad_norms).float().mean()) if grad_norms else float("nan"),
            "learning_rate": lr,
            "num_sequences": int(num_sequences),
            "num_tokens": int(input_tokens),
            "num_target_tokens": int(target_tokens),
            "pad_fraction": pad_tokens / (pad_tokens + input_tokens) if input_tokens else 0.0,
            "updates": updates,
            "global_step": self.state.global_step,
            "step_time": elapsed,
            "tokens_per_second": input_tokens / elapsed if elapsed > 0 else 0.0,
        }

    def _collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """A micro-batch: packed rows with `packing`, else `data_collator`'s padded ones."""
        if self.packing:
            return PackingCollator(self.tokenizer.pad_token_id)(examples)
        return self.data_collator(examples)

    def _empty_batch(self) -> dict[str, torch.Tensor]:
        """A one-token batch with no targets: it joins the ranks' collectives and adds nothing."""
        pad = self.tokenizer.pad_token_id
        example = {"input_ids": torch.tensor([pad]), "labels": torch.tensor([IGNORE_INDEX])}
        return self._collate([example])

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` and return the norm before clipping, over all ranks' shards."""
        if not self.sharded:
            return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm).detach()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()

    def _count_targets(self, labels: torch.Tensor) -> int:
        shifted = labels if self.is_encoder_decoder else labels[:, 1:]
        return int((shifted != IGNORE_INDEX).sum())

    def _token_loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of token cross-entropies of a micro-batch (the caller normalises per update)."""
        labels = batch["labels"]
        if self.is_encoder_decoder:
            unwrapped = self.accelerator.unwrap_model(model)
            decoder_input_ids = unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=decoder_input_ids,
            ).logits
            targets = labels
        else:
            # Logits only where a target follows (the completions, not the prompts): the LM head's output is
            # positions x vocabulary, the largest activation of a step at a real vocabulary (152k ids), and its
            # cross-entropy and gradient are as large again.
            keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
            inputs = dict(input_ids=batch["input_ids"])
            if "position_ids" in batch:
                # Packed rows: no attention mask and no cache (even with `use_cache: true`), or transformers does
                # not look for the packed sequences in `position_ids` and a row's examples attend to each other.
                inputs.update(position_ids=batch["position_ids"], use_cache=False)
            else:
                inputs.update(attention_mask=batch["attention_mask"])
            logits = model(**inputs, logits_to_keep=keep).logits
            targets = labels[:, keep + 1]
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    # ---------------------------------------------------------------- logging

    @staticmethod
    def _new_log_window() -> dict[str, float]:
        return {"grad_norm": 0.0, "updates": 0}

    def _log_update(self, grad_norm: torch.Tensor, lr: float) -> None:
        """Send grad norm and learning rate to `report_to` every `logging_steps` updates."""
        window = self._logged_since
        window["grad_norm"] += grad_norm
        window["updates"] += 1
        steps = self.args.logging_steps
        every = max(1, int(steps if steps >= 1 else math.ceil(steps * max(self.args.max_steps, 1))))
        if self.args.logging_strategy != "no" and self.state.global_step % every == 0:
            self.log({"grad_norm": float(window["grad_norm"]) / window["updates"], "learning_rate": lr})
            self._logged_since = self._new_log_window()
