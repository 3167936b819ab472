# The "Usage" code of the seed page (shared/seeds/, TRL's Iterative Trainer page), copied verbatim
# below the prelude. The prelude defines only what the page leaves undefined: its imports,
# model_name (a tiny model saved offline), input_ids, attention_mask and texts.
# tests/test_seed_usage.py runs this file and checks that both steps trained.
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterft_ray import IterativeSFTTrainer
from iterft_ray.tiny import build_tiny_model

model_name = str(build_tiny_model("tiny-llama", tempfile.mkdtemp(prefix="seed-usage-")))
input_ids = [torch.tensor([1, 40, 41, 42, 43, 2]), torch.tensor([1, 50, 51, 2])]
attention_mask = [torch.ones_like(ids) for ids in input_ids]
texts = ["The quick brown fox", "jumps over the lazy dog"]

# ---- the page, verbatim

model = AutoModelForCausalLM.from_pretrained(model_name)
tokenizer = AutoTokenizer.from_pretrained(model_name)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
trainer = IterativeSFTTrainer(
    model,
    tokenizer
)

inputs = {
    "input_ids": input_ids,
    "attention_mask": attention_mask
}
trainer.step(**inputs)

inputs = {
    "texts": texts
}
trainer.step(**inputs)
