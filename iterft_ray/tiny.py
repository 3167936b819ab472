"""Tiny language models and tokenizers built offline, for tests, demos and benchmarks.

Nothing here downloads: a model is made from a config with random weights and a
byte-level tokenizer is made with the `tokenizers` library, then both are saved with
`save_pretrained`. Everything downstream loads them back through the real
`AutoModelForCausalLM` / `AutoModelForSeq2SeqLM` / `AutoTokenizer.from_pretrained`
code paths, so the same code works with any local or hub model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PreTrainedTokenizerFast,
)

if TYPE_CHECKING:
    from iterft_ray.config import ModelConfig

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# A ChatML-style template (as Qwen's), BOS first as Llama's templates do: the BOS a plain
# `tokenizer(text)` would add is in the template's text, so the templated text must not get another.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Small enough to train on 2 CPU cores; every value can be overridden per call.
TINY_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "tiny-t5": dict(
        model_type="t5",
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
    ),
}


# tiny-llama with a chat template and two stop tokens (`build_tiny_model(chat_template=True)`): for `env:` runs.
TINY_CONFIGS["tiny-llama-chat"] = dict(TINY_CONFIGS["tiny-llama"], chat_template=True)

# What `build_tokenizer(merges=True)` learns its merges from: chat turns, arithmetic, tool calls. A fixed text, so
# the same merges every time.
MERGES_CORPUS = [
    "<|im_start|>user\nWhat is 12+34?<|im_end|>\n<|im_start|>assistant\n<calc>12+34</calc><|im_end|>\n",
    "<|im_start|>tool\n<result>46</result><|im_end|>\n<|im_start|>assistant\n46<|im_end|>\n",
    "the answer is 1234567890, wrong, try again; left: 3 2 1 0. def f(x): return x * 2\n",
] * 20


def build_tokenizer(seq2seq: bool = False, chat_template: bool = False,
                    merges: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer, with no merges unless `merges`: every byte is one token, so any text encodes.

    `merges=True` learns BPE merges from `MERGES_CORPUS` (a vocabulary of 512), so a text's tokens are not its
    bytes, and decoding sampled ids and encoding the text again can give other ids, as with real tokenizers.

    Causal models get a BOS in front (Llama's convention); seq2seq models get an EOS at
    the end (T5's convention). Pad is its own token. `chat_template=True` adds
    `CHAT_TEMPLATE` and its `<|im_start|>` / `<|im_end|>` as special tokens, like an
    instruct model's tokenizer.
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if merges:
        tok.train_from_iterator(MERGES_CORPUS, trainers.BpeTrainer(
            vocab_size=512, special_tokens=specials, initial_alphabet=byte_alphabet, show_progress=False))
    if seq2seq:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
    )
    if chat_template:
        tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    name: str, out_dir: str | os.PathLike, seed: int = 0, chat_template: bool = False, merges: bool = False,
    **overrides
) -> Path:
    """Build tiny model `name` (a key of TINY_CONFIGS) with its tokenizer and save both to `out_dir`.

    `overrides` replace config values, e.g. `hidden_size=128, num_hidden_layers=3`.
    `chat_template=True` (causal models) gives the tokenizer `CHAT_TEMPLATE` and the model
    two stop tokens, `<|im_end|>` and `</s>`, as an instruct model's generation config has;
    `merges=True`, a tokenizer with BPE merges (`build_tokenizer`).
    Returns the directory, ready for `from_pretrained`.
    """
    if name not in TINY_CONFIGS:
        raise ValueError(f"name: expected one of {sorted(TINY_CONFIGS)}, got {name!r}")
    seq2seq = name == "tiny-t5"
    if chat_template and seq2seq:
        raise ValueError("chat_template: only for causal tiny models, not tiny-t5")
    settings = dict(TINY_CONFIGS[name])
    model_type = settings.pop("model_type")
    chat_template = settings.pop("chat_template", False) or chat_template
    tokenizer = build_tokenizer(seq2seq=seq2seq, chat_template=chat_template, merges=merges)
    settings.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if seq2seq:
        settings["decoder_start_token_id"] = tokenizer.pad_token_id
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    auto_cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto_cls.from_config(config)
    # Tiny models sample from a generation config that has no max_length surprises.
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = (
        [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id] if chat_template else tokenizer.eos_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_reward_model(out_dir: str | os.PathLike, seed: int = 0, chat_template: bool = False,
                            **overrides) -> Path:
    """A tiny-llama-shaped reward model (`LlamaForSequenceClassification`, one label) with the tiny tokenizer,
    random weights, saved to `out_dir` for `AutoModelForSequenceClassification.from_pretrained`.

    The `reward_model` filter's test model, and the start of a checker trained in `jobs/`.
    """
    from transformers import AutoModelForSequenceClassification

    tokenizer = build_tokenizer(chat_template=chat_template)
    settings = {k: v for k, v in TINY_CONFIGS["tiny-llama"].items() if k != "model_type"}
    settings.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, num_labels=1, tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model("llama", **settings))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_model_path(name: str, cache_dir: str | os.PathLike | None = None, **overrides) -> Path:
    """Path of built-in tiny model `name`, built once into a cache directory.

    Lets configs say `model: tiny-llama` where they would say a hub name.
    """
    root = Path(cache_dir or os.environ.get("ITERFT_CACHE", Path.home() / ".cache" / "iterft_ray"))
    suffix = "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    out = root / (f"{name}-{suffix}" if suffix else name)
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build_tiny_model(name, tmp, **overrides)
        try:
            tmp.rename(out)
        except OSError:  # another process built it first
            pass
    return out


def resolve_model_path(name_or_path: str, **tiny_overrides) -> str:
    """A built-in tiny name becomes its cached path (built on this node if needed); anything else is kept.

    Actors call this themselves, so a tiny model needs no shared disk on a cluster.
    """
    if name_or_path in TINY_CONFIGS:
        return str(tiny_model_path(name_or_path, **tiny_overrides))
    if tiny_overrides:
        raise ValueError(f"model.tiny_overrides: only for built-in tiny models {sorted(TINY_CONFIGS)}")
    return name_or_path


def model_files(model: ModelConfig) -> tuple[str, str]:
    """(model path, tokenizer path) of a `ModelConfig` on this node: the one place a config's model becomes
    files a loader reads (a tiny name is built here first; `model.tokenizer` defaults to the model's own)."""
    path = resolve_model_path(model.name_or_path, **model.tiny_overrides)
    return path, model.tokenizer or path
