"""Chat templates: prompts rendered with the tokenizer's template into the token ids the engines sample from
and the trainer trains on (`data.chat_template`)."""

from __future__ import annotations

import pyarrow as pa

from iterft_ray.config import ModelConfig


def load_chat_tokenizer(model: ModelConfig):
    """The run's tokenizer, loaded on the driver, for `data.chat_template`; it must have a template."""
    from transformers import AutoTokenizer

    from iterft_ray.tiny import model_files

    path = model_files(model)[1]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    if not tokenizer.chat_template:
        raise ValueError(f"data.chat_template: true, but the tokenizer of {model.tokenizer or model.name_or_path} "
                         "has no chat template; use an instruct model's tokenizer (model.tokenizer) or set "
                         "data.chat_template: false")
    return tokenizer


def conversation(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A prompt as chat messages: the system prompt (if any), then the prompt as the user's message."""
    return [*([{"role": "system", "content": system_prompt}] if system_prompt else []),
            {"role": "user", "content": prompt}]


def with_chat_template(prompts: pa.Table, tokenizer, system_prompt: str | None = None) -> pa.Table:
    """`prompts` with a `prompt_ids` column: each row's chat-template tokens, the assistant's turn opened.

    A row's `messages` (when the table has that column) are used as given; otherwise its
    `prompt` becomes a user message after `system_prompt`. The ids are the template's
    tokens as `apply_chat_template` makes them (no special tokens added to the rendered
    text), and the engines sample from them unchanged.
    """
    texts = prompts.column("prompt").to_pylist()
    given = prompts.column("messages").to_pylist() if "messages" in prompts.column_names else [None] * len(texts)
    conversations = [messages or conversation(text, system_prompt) for text, messages in zip(texts, given)]
    ids = [template_ids(tokenizer, c, add_generation_prompt=True) for c in conversations]
    if "prompt_ids" in prompts.column_names:
        prompts = prompts.drop_columns(["prompt_ids"])
    return prompts.append_column("prompt_ids", pa.array(ids, pa.list_(pa.int32())))


def chat_example_ids(tokenizer, prompt: str, completion: str, system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a supervised chat example: the prompt's template tokens (as `with_chat_template`
    makes them, labels -100) and the assistant's turn as the template closes it (its end-of-turn token
    included, so the model learns to stop where sampling stops)."""
    messages = conversation(prompt, system_prompt)
    prompt_ids = template_ids(tokenizer, messages, add_generation_prompt=True)
    full = template_ids(tokenizer, [*messages, {"role": "assistant", "content": completion}])
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        completion_ids = full[len(prompt_ids):]
    else:  # a template that renders past turns differently (e.g. drops reasoning): the text and EOS
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    # transformers 5 returns a BatchEncoding here; it tokenizes the rendered text with add_special_tokens=False.
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)
    return list(out["input_ids"])
