"""Chat templates (`data.chat_template`): a run samples from exactly the template's tokens, system prompt
included, on both engines; warm-up and held-out prompts use the same template; bad settings are refused
before Ray starts.

The tiny Llama's tokenizer has a ChatML-style template whose text starts with BOS, so re-tokenizing the
templated text with special tokens would give two BOS: the tests count them. Its generation config stops
on `<|im_end|>` and `</s>`. head_dim is 32 (2 heads of 64), as vLLM's CPU attention needs.
"""

import json

import pyarrow.parquet as pq
import pytest
import ray
from transformers import AutoTokenizer

from iterft_ray.run.loop import IterativeLoop
from iterft_ray.data.chat import chat_example_ids, with_chat_template
from iterft_ray.data.prompts import read_prompt_file
from iterft_ray.engines.hf_sampling import stop_token_ids
from iterft_ray.tiny import IM_END, build_tiny_model

# The module's trainers reuse its earlier trainers' actors (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("warm_actors")

SYSTEM = "Answer with the sum only."


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    return str(build_tiny_model("tiny-llama", tmp_path_factory.mktemp("chat") / "llama", chat_template=True,
                                num_attention_heads=2, num_key_value_heads=2))


@pytest.fixture(scope="module")
def tokenizer(chat_path):
    return AutoTokenizer.from_pretrained(chat_path)


def _template(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def _config(model, out, **data):
    return {
        "model": {"name_or_path": model},
        "data": {"task": "addition", "task_options": {"num_train": 16, "num_heldout": 4, "num_warmup": 8}, **data},
        "filters": [{"name": "length_bounds", "min_chars": 1}],
        "sampling": {"num_samples": 2, "max_new_tokens": 4},
        "trainer": {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "optim": "adamw_torch"},
        "resources": {"num_generators": 1, "filter_pool_size": 1},
        "loop": {"rounds": 1, "prompts_per_round": 8, "save_every": 10, "warmup_passes": 1, "output_dir": str(out)},
    }


def test_tiny_chat_model_has_template_and_two_stop_tokens(chat_path, tokenizer):
    from transformers import GenerationConfig

    assert tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert stop_token_ids(GenerationConfig.from_pretrained(chat_path), tokenizer) == [im_end, tokenizer.eos_token_id]


def test_bad_settings_are_refused_before_ray_starts(llama_path, chat_path, tmp_path, ray_down):
    assert not ray.is_initialized()
    with pytest.raises(ValueError, match=r"data\.chat_template: true, but the tokenizer .* has no chat template"):
        IterativeLoop(_config(str(llama_path), tmp_path / "a", chat_template=True))
    with pytest.raises(ValueError, match=r"data\.system_prompt: .* set data\.chat_template: true"):
        IterativeLoop(_config(chat_path, tmp_path / "b", system_prompt=SYSTEM))
    with pytest.raises(TypeError, match=r"data\.chat_template: expected bool"):
        IterativeLoop(_config(chat_path, tmp_path / "c", chat_template="yes"))
    messages = tmp_path / "m.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1="}]}) + "\n")
    config = _config(chat_path, tmp_path / "d")
    config["data"] = {"task": None, "prompts_file": str(messages)}
    config["loop"]["warmup_passes"] = 0
    with pytest.raises(ValueError, match=r"data\.prompts_file: .*'messages' column.* data\.chat_template: true"):
        IterativeLoop(config)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "system", "content": "hi"}]}) + "\n")
    config["data"] = {"task": None, "prompts_file": str(bad), "chat_template": True}
    with pytest.raises(ValueError, match=r"data\.prompts_file: .*row 1: column 'messages' has no user message"):
        IterativeLoop(config)
    assert not ray.is_initialized()
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_messages_column_is_used_as_given(tokenizer, tmp_path):
    conversations = [
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2="}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "3+4="}],
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m, "answer": str(i)}) + "\n" for i, m in enumerate(conversations)))
    table = with_chat_template(read_prompt_file(path), tokenizer, system_prompt=SYSTEM)
    assert table.column("prompt").to_pylist() == ["2+2=", "3+4="]  # what filters see: the last user message
    assert table.column("prompt_ids").to_pylist() == [_template(tokenizer, m) for m in conversations]


def test_warm_up_examples_use_the_template_and_end_the_turn(tokenizer):
    input_ids, labels = chat_example_ids(tokenizer, "1+2=", "3", SYSTEM)
    prompt = _template(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "1+2="}])
    assert input_ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
    completion = input_ids[len(prompt):]
    assert labels[len(prompt):] == completion
    assert tokenizer.decode(completion) == "3<|im_end|>\n"
    assert input_ids.count(tokenizer.bos_token_id) == 1


@pytest.fixture
def ray_local(ray_up):
    """The session's Ray (tests/conftest.py)."""


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_run_samples_exactly_the_template_tokens(engine, ray_local, chat_path, tokenizer, tmp_path):
    config = _config(chat_path, tmp_path / "run", chat_template=True, system_prompt=SYSTEM)
    config["sampling"]["engine"] = engine
    loop = IterativeLoop(config)
    try:
        loop.run()
        heldout_ids = loop.evaluation.prompts.column("prompt_ids").to_pylist()
        heldout_prompts = loop.evaluation.prompts.column("prompt").to_pylist()
    finally:
        loop.shutdown()
    rows = pq.read_table(tmp_path / "run" / "rounds" / "0001" / "generations.parquet").to_pylist()
    assert len(rows) == 8 * 2
    system_ids = tokenizer(SYSTEM, add_special_tokens=False)["input_ids"]
    for row in rows:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["prompt"]}]
        ids = row["prompt_ids"]
        assert ids == _template(tokenizer, messages)
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
        assert any(ids[i : i + len(system_ids)] == system_ids for i in range(len(ids)))
    for prompt, ids in zip(heldout_prompts, heldout_ids):  # held-out evaluation samples the same template
        assert ids == _template(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])
