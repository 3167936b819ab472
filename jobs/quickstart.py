"""The seed API on a tiny model, no Ray: build a model offline, then step() on texts and tensors."""

import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterft_ray import IterativeSFTConfig, IterativeSFTTrainer
from iterft_ray.tiny import build_tiny_model


def main() -> None:
    path = build_tiny_model("tiny-llama", tempfile.mkdtemp())
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = IterativeSFTConfig(output_dir=tempfile.mkdtemp(), learning_rate=3e-3, per_device_train_batch_size=4,
                              report_to="none")
    trainer = IterativeSFTTrainer(model, args, processing_class=tokenizer)

    prompts, answers = ["12+30=", "7+5=", "20+3=", "1+1="], ["42", "12", "23", "2"]
    for i in range(20):
        stats = trainer.step(texts=prompts, texts_labels=[a + tokenizer.eos_token for a in answers])
        if i % 5 == 0:
            print(f"step {i:2d}  loss {stats['loss']:.3f}  updates {stats['global_step']}  "
                  f"{stats['tokens_per_second']:.0f} tok/s")
    ids = [torch.tensor(x) for x in tokenizer(["12+30=42"])["input_ids"]]
    print("tensors:", trainer.step(input_ids=ids))


if __name__ == "__main__":
    main()
