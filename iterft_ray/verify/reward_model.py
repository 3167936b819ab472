"""Reward models as scorers (RAFT, Dong et al. 2023): the `reward_model` filter and the code that runs one.

A reward model is a Hugging Face sequence-classification model with one label
(`AutoModelForSequenceClassification`, `num_labels: 1`); its logit for (prompt, completion) is the
row's reward. It is not a row filter: a row filter runs per row in a filter process
(`iterft_ray.verify.processes`), which would load the weights in every process and score one row at
a time. `reward_model(...)` returns a `RewardModel` descriptor instead, which the scoring code
(`iterft_ray.verify.scoring`) recognises and sends whole batches to; `RewardScorer` is the model
itself, loaded once by whoever serves it (an actor of `iterft_ray.actors.reward_pool`, or the
scoring process when there is no Ray). Nothing here knows about Ray.

torch and transformers are imported where a model is loaded, so that resolving a filter spec (the
driver, at config load) stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RewardModel:
    """The `reward_model` filter: which model scores, and how (a descriptor; it holds no weights).

    Frozen and compared by value, so the same spec written twice (the run's filters, the
    evaluation's) finds the same pool of actors.
    """

    model: str
    batch_size: int = 16
    max_length: int | None = None

    @property
    def __name__(self) -> str:  # how errors and the ledger name it
        return f"reward_model({self.model})"


def reward_model(model: str, batch_size: int = 16, max_length: int | None = None) -> RewardModel:
    """Filter (RAFT): add a sequence-classification reward model's logit for (prompt, completion) to the score.

    `model` is a local model directory or a hub id. The text is the reward model's own chat
    template with the prompt as the user turn and the completion as the assistant turn when its
    tokenizer has one, else prompt + completion. `batch_size` rows go through the model at once;
    `max_length` tokens at most, cut from the start, so the completion is what is kept. It rejects
    no row: follow it with a selector (`best_of_k`).
    """
    if not isinstance(model, str) or not model:
        raise ValueError(f"filter 'reward_model': model: expected a local model directory or a hub id, got {model!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"filter 'reward_model': batch_size: expected an integer >= 1, got {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"filter 'reward_model': max_length: expected an integer >= 2 or null, got {max_length!r}")
    return RewardModel(_check_model_source(model), batch_size, max_length)


def _check_model_source(model: str) -> str:
    """A local directory holding a one-label sequence-classification model (made absolute, as actors run
    elsewhere), or a hub id: in the hub cache when HF_HUB_OFFLINE is set, else checked when an actor loads it
    (config load does not go to the network)."""
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith(("/", "./", "../", "~")) or model.count("/") > 1
    if not looks_local:
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ValueError(f"filter 'reward_model': model: {model!r} is not a local directory and not in the hub "
                             "cache (HF_HUB_OFFLINE is set); expected a model directory or a hub id")
        return model
    where = f"filter 'reward_model': model: {model}"
    if not (path / "config.json").is_file():
        raise ValueError(f"{where} is not a model directory (no config.json); expected a directory saved with "
                         "save_pretrained or a hub id")
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"{where} is a {architectures[0]}, not a sequence-classification model "
                         "(AutoModelForSequenceClassification with num_labels: 1)")
    labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)
    if labels != 1:
        raise ValueError(f"{where} has {labels} labels; a reward model has one (num_labels: 1), its logit the reward")
    return str(path.resolve())


def reward_texts(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[str], bool]:
    """The texts the reward model reads, and whether they already hold the special tokens (a chat template's).

    With a chat template: the prompt is the user turn, the completion the assistant turn. Without
    one: prompt + completion, as the policy saw and wrote it; the tokenizer adds its own BOS.
    """
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                               tokenize=False) for p, c in zip(prompts, completions)]
        return texts, True
    return [p + c for p, c in zip(prompts, completions)], False


class RewardScorer:
    """A loaded reward model and its tokenizer: `score(prompts, completions)` -> one float per row.

    bf16 on a GPU, fp32 on a CPU (where bf16 matmuls are slow and would move scores for nothing).
    Rows are sorted by length before batching, so a batch pads little; scores come back in row order.
    Padding is on the right, and the model reads the logit at each row's last real token.
    """

    def __init__(self, spec: RewardModel, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(spec.model, dtype=dtype).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"filter 'reward_model': model: {spec.model} has {self.model.config.num_labels} labels; "
                             "a reward model has one (num_labels: 1)")
        if self.model.config.pad_token_id is None:  # it finds each row's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The reward of each (prompt, completion), in order."""
        import torch

        texts, templated = reward_texts(self.tokenizer, prompts, completions)
        encoded = self.tokenizer(texts, add_special_tokens=not templated, truncation=self.spec.max_length is not None,
                                 max_length=self.spec.max_length)["input_ids"]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        with torch.inference_mode():
            for start in range(0, len(order), self.spec.batch_size):
                rows = order[start:start + self.spec.batch_size]
                batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
                logits = self._forward(batch["input_ids"], batch["attention_mask"])
                for i, value in zip(rows, logits.tolist()):
                    scores[i] = float(value)
        return scores

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.logits[:, 0].float().cpu()
