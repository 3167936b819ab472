"""`trainer.packing`: a micro-batch's causal examples packed into rows instead of padded, and the check
that the model's attention keeps packed examples apart.

A packed micro-batch holds the same examples as the padded one (the update is the same), in
fewer, fuller rows: on ragged rollouts most of a padded batch's compute goes to pad tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DataCollatorWithFlattening

from iterft_ray.train.batching import IGNORE_INDEX


class PackingCollator:
    """Packs a micro-batch's causal examples into rows no longer than its longest example, with no padding
    between them (`trainer.packing`).

    Rows are filled first-fit, longest example first; transformers' `DataCollatorWithFlattening`
    joins each row's examples with `position_ids` restarting at 0 and the label of each example's
    first token set to -100, so no target crosses a boundary and the targets are the padded batch's.
    A row shorter than the longest is filled with pad tokens that form their own sequence
    (positions from 0, labels -100). The batch has no `attention_mask` for the model: transformers
    finds packed sequences from `position_ids` only when there is none (`find_packed_sequence_indices`),
    and then masks attention between them for eager, sdpa and flex attention, and flash-attention
    runs its variable-length kernel. Its `token_mask` (1 on example tokens) is for counting tokens.
    Tokens an example's attention mask hides are dropped: they are neither attended to nor trained on.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        examples = []
        for f in features:
            ids = torch.as_tensor(f["input_ids"]).long()
            labels = torch.as_tensor(f["labels"]).long() if "labels" in f else ids.clone()
            if "attention_mask" in f:
                keep = torch.as_tensor(f["attention_mask"]).bool()
                ids, labels = ids[keep], labels[keep]
            examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
        width = max(len(e["input_ids"]) for e in examples)
        rows = [self._flatten(row) for row in _first_fit(examples, width)]
        filler = [width - r["input_ids"].shape[1] for r in rows]
        return {
            "input_ids": torch.cat([_fill(r["input_ids"][0], n, self.pad_token_id) for r, n in zip(rows, filler)]),
            "labels": torch.cat([_fill(r["labels"][0], n, IGNORE_INDEX) for r, n in zip(rows, filler)]),
            "position_ids": torch.cat([_fill(r["position_ids"][0], n, None) for r, n in zip(rows, filler)]),
            "token_mask": torch.cat([_fill(torch.ones_like(r["input_ids"][0]), n, 0) for r, n in zip(rows, filler)]),
        }


def _first_fit(examples: list[dict], width: int) -> list[list[dict]]:
    """Examples in rows of at most `width` tokens: longest first, each into the first row it fits."""
    rows: list[list[dict]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True):
        n = len(example["input_ids"])
        i = next((i for i, r in enumerate(room) if r >= n), len(rows))
        if i == len(rows):
            rows.append([])
            room.append(width)
        rows[i].append(example)
        room[i] -= n
    return rows


def _fill(row: torch.Tensor, n: int, value: int | None) -> torch.Tensor:
    """`row` followed by `n` filler entries (`value`, or positions 0..n-1 when None), as one row of a batch."""
    tail = torch.arange(n, dtype=row.dtype) if value is None else torch.full((n,), value, dtype=row.dtype)
    return torch.cat([row, tail]).unsqueeze(0)


def check_packed_attention(model: torch.nn.Module) -> None:
    """Refuse packing when the model lets a packed example attend to the one before it.

    Transformers keeps packed examples apart from `position_ids` in its mask builder
    (`masking_utils.find_packed_sequence_indices`, used by eager, sdpa and flex attention) and in
    flash-attention's variable-length path; checked on transformers 5.19 for llama, qwen2 and gpt2
    with sdpa and eager. Older releases did it for flash-attention only, and remote-code models
    may build their own masks: so one tiny forward here compares an example packed behind
    another with the same example alone, rather than trusting a list of architectures.
    """
    device = next(model.parameters()).device
    first, second = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[7, 8, 9]])
    packed_ids = torch.cat([first, second], dim=1).to(device)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits[0, 4:].float()
        alone = model(input_ids=second.to(device), use_cache=False).logits[0].float()
    model.train(was_training)
    if not torch.allclose(packed, alone, atol=1e-3, rtol=1e-3):
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(
            f"trainer.packing: this model's attention ({attn}) lets packed examples attend to each other "
            f"(max logit difference {float((packed - alone).abs().max()):.3g}); set packing: false, or use an "
            "attention implementation that reads packed position_ids (sdpa/eager on transformers >= 5.19, "
            "flash_attention_2)"
        )
