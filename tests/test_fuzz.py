"""Fuzzing `IterativeSFTTrainer.step()` and `load_config()` with hypothesis.

The property, for every generated input: it either works, or it raises a clear
`ValueError`/`TypeError` that names the offending argument (for `step()`) or starts
with the dotted key path (for configs), and a failed `step()` leaves the weights
bit-identical and `global_step` unchanged. Any other exception type is a failure.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from iterft_ray import IterativeSFTConfig, IterativeSFTTrainer
from iterft_ray.config import RunConfig, load_config

STEP_ARGS = ("input_ids", "attention_mask", "labels", "texts", "texts_labels")
NAMES_AN_ARG = re.compile(r"\b(" + "|".join(STEP_ARGS) + r")\b")

# step() fuzzing trains a model on every valid example, so shrinking a failure would run
# thousands of steps (Hypothesis gives up after five minutes): the failing example is
# reported as generated (inputs are small anyway), and test_step_edge_cases holds
# minimal hand-written cases. Config fuzzing is cheap, so it runs more and shrinks.
STEP_FUZZ = settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONFIG_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- trainers

# (id, model fixture, seq2seq, extra IterativeSFTConfig settings)
TRAINERS = [
    ("llama", "llama_path", False, {}),
    ("llama-max_length-5-keep_start", "llama_path", False, {"max_length": 5, "truncation_mode": "keep_start"}),
    ("t5", "t5_path", True, {}),
    # Absolute position embeddings (n_positions=512): very long texts must be cut or refused.
    ("gpt2", "gpt2_path", False, {}),
]


@pytest.fixture(scope="module")
def gpt2_path(tiny_paths):
    return tiny_paths["tiny-gpt2"]


@pytest.fixture(scope="module", params=TRAINERS, ids=[t[0] for t in TRAINERS])
def trainer(request, tmp_path_factory):
    name, path_fixture, seq2seq, extra = request.param
    path = request.getfixturevalue(path_fixture)
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    args = IterativeSFTConfig(
        output_dir=str(tmp_path_factory.mktemp(f"fuzz-{name}")),
        report_to="none",
        disable_tqdm=True,
        learning_rate=1e-3,
        per_device_train_batch_size=2,
        seed=0,
        **extra,
    )
    return IterativeSFTTrainer(cls.from_pretrained(path), args, processing_class=AutoTokenizer.from_pretrained(path))


def snapshot(trainer) -> torch.Tensor:
    """Every parameter, flattened into one fresh tensor (the model is tiny)."""
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]).clone()


def check_step(trainer, kwargs: dict) -> None:
    """The property: `step(**kwargs)` works, or fails cleanly and changes nothing."""
    before = snapshot(trainer)
    step0 = trainer.state.global_step
    try:
        stats = trainer.step(**kwargs)
    except Exception as e:  # noqa: BLE001 - the type is checked below, with the state
        error = f"{type(e).__name__}: {str(e)[:300]}"
        same_weights = torch.equal(snapshot(trainer), before)
        same_step = trainer.state.global_step == step0
        state = f"weights unchanged: {same_weights}, global_step unchanged: {same_step}"
        assert isinstance(e, (ValueError, TypeError)), f"not a ValueError/TypeError: {error} ({state})"
        assert NAMES_AN_ARG.search(str(e)), f"names no argument: {error}"
        assert same_weights and same_step, f"state changed before the error: {error} ({state})"
        return
    assert isinstance(stats, dict)
    loss = stats["loss"]
    assert isinstance(loss, float) and (math.isfinite(loss) or math.isnan(loss)), loss
    if stats["num_target_tokens"] > 0:
        assert math.isfinite(loss), stats
    assert stats["updates"] >= 0
    assert stats["global_step"] == step0 + stats["updates"] == trainer.state.global_step, (stats, step0)
    assert bool(torch.isfinite(snapshot(trainer)).all()), "a step that worked left non-finite weights"


# ---------------------------------------------------------------- step strategies

INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
DTYPES = [*INT_DTYPES, torch.float32, torch.float64, torch.bool]
HUGE = [2**31 - 1, 2**31, 2**40, 2**63 - 1, -(2**63), -(2**40)]


def token_values(vocab: int, labels: bool = False) -> st.SearchStrategy[int]:
    valid = st.integers(0, vocab - 1)
    bad = st.one_of(st.integers(-300, -1), st.integers(vocab, vocab + 300), st.sampled_from(HUGE))
    if labels:
        return st.one_of(valid, valid, st.just(-100), st.just(-100), bad)
    return st.one_of(valid, valid, valid, bad)


def mask_values() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 1, 1]), st.sampled_from([-1, 2, 255]))


def make_tensor(values: list[int], dtype: torch.dtype, shape: str) -> torch.Tensor:
    if dtype in INT_DTYPES:
        info = torch.iinfo(dtype)
        values = [min(max(v, info.min), info.max) for v in values]
    elif dtype == torch.bool:
        values = [v != 0 for v in values]
    t = torch.tensor(values, dtype=dtype)
    if shape == "0d":
        return t[0] if t.numel() else torch.tensor(1, dtype=dtype)
    if shape == "empty":
        return t[:0]
    if shape == "2d":
        return t.reshape(1, -1)
    if shape == "2d-empty":
        return t[:0].reshape(0, 1) if t.numel() else t.reshape(0, 0)
    return t


@st.composite
def a_tensor(draw, values: st.SearchStrategy[int], length: int | None = None):
    """Mostly a valid-looking int64 1-D tensor; sometimes another dtype, shape or length."""
    dtype = draw(st.one_of(st.just(torch.int64), st.just(torch.int64), st.sampled_from(DTYPES)))
    shape = draw(st.one_of(st.just("1d"), st.just("1d"), st.just("1d"), st.sampled_from(["0d", "empty", "2d", "2d-empty"])))
    if length is None or draw(st.integers(0, 9)) == 0:
        length = draw(st.integers(1, 6))
    return make_tensor(draw(st.lists(values, min_size=length, max_size=length)), dtype, shape)


def wild() -> st.SearchStrategy[typing.Any]:
    """Values of the wrong kind for any step() argument."""
    return st.one_of(
        st.integers(-5, 5),
        st.text(max_size=5),
        st.binary(max_size=5),
        st.floats(allow_nan=True),
        st.dictionaries(st.text(max_size=3), st.integers(0, 5), max_size=2),
        st.lists(st.one_of(st.integers(0, 50), st.text(max_size=3), st.none()), max_size=3),
        st.lists(st.lists(st.integers(0, 50), max_size=3), max_size=2),
        st.builds(lambda n: torch.randint(0, 50, (1, n)), st.integers(1, 4)),
        st.builds(lambda n: torch.randint(0, 50, (n,)), st.integers(1, 4)),
    )


def container(draw, items: list) -> typing.Any:
    """The list, usually; sometimes as a tuple, a dict or an iterator."""
    kind = draw(st.one_of(st.just("list"), st.just("list"), st.just("list"), st.sampled_from(["tuple", "dict", "iter"])))
    if kind == "tuple":
        return tuple(items)
    if kind == "dict":
        return dict(enumerate(items))
    if kind == "iter":
        return iter(items)
    return items


# Long enough to pass GPT-2's 512 positions, short enough for a CPU step in well under a second.
LONG = st.integers(520, 1500).map(lambda n: ("12+30=42 " * (n // 9 + 1))[:n])
ODD_TEXT = st.sampled_from(["", " ", "\ud800", "a\udcffb", "\x00", "\n\t", "é漢🙂", "\ufeff", "-100"])


def a_text() -> st.SearchStrategy[typing.Any]:
    ok = st.text(max_size=6)
    not_str = st.one_of(
        st.integers(), st.none(), st.binary(max_size=4), st.floats(), st.lists(st.text(max_size=2), max_size=2)
    )
    return st.one_of(ok, ok, ok, ok, ok, ok, ODD_TEXT, ODD_TEXT, not_str, LONG)


@st.composite
def text_kwargs(draw) -> dict:
    n = draw(st.integers(0, 4))
    texts = draw(st.lists(a_text(), min_size=n, max_size=n))
    kwargs = {"texts": container(draw, texts) if draw(st.integers(0, 9)) else draw(wild())}
    choice = draw(st.sampled_from(["none", "same", "same", "same", "other", "wild"]))
    if choice != "none":
        m = n if choice == "same" else draw(st.integers(0, 5))
        labels = draw(st.lists(a_text(), min_size=m, max_size=m))
        kwargs["texts_labels"] = container(draw, labels) if choice != "wild" else draw(wild())
    if draw(st.integers(0, 9)) == 0:  # a tensor argument alongside texts
        kwargs[draw(st.sampled_from(["input_ids", "attention_mask", "labels"]))] = draw(wild())
    return kwargs


@st.composite
def tensor_kwargs(draw, vocab: int) -> dict:
    n = draw(st.integers(0, 4))
    ids = [draw(a_tensor(token_values(vocab))) for _ in range(n)]
    kwargs = {"input_ids": container(draw, ids) if draw(st.integers(0, 9)) else draw(wild())}
    for name, values in (("attention_mask", mask_values()), ("labels", token_values(vocab, labels=True))):
        choice = draw(st.sampled_from(["none", "none", "like", "like", "ragged", "wild"]))
        if choice == "none":
            continue
        if choice == "wild":
            kwargs[name] = draw(wild())
            continue
        m = n if choice == "like" else draw(st.integers(0, 5))
        lengths = [ids[i].numel() if i < n and ids[i].dim() == 1 else None for i in range(m)]
        kwargs[name] = container(draw, [draw(a_tensor(values, length)) for length in lengths])
    if draw(st.integers(0, 9)) == 0:
        name = draw(st.sampled_from(["texts", "texts_labels"]))
        kwargs[name] = draw(st.one_of(wild(), st.lists(st.text(max_size=3), max_size=2)))
    return kwargs


@st.composite
def clean_tensor_kwargs(draw, vocab: int) -> dict:
    """Well-formed int64 1-D tensors with valid ids and 0/1 masks; only label values may be bad."""
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    ids = [torch.tensor(draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))) for n in lengths]
    kwargs = {"input_ids": ids}
    if draw(st.booleans()):
        bits = st.sampled_from([0, 1, 1])
        kwargs["attention_mask"] = [torch.tensor(draw(st.lists(bits, min_size=n, max_size=n))) for n in lengths]
    if draw(st.booleans()):
        values = token_values(vocab, labels=True)
        kwargs["labels"] = [torch.tensor(draw(st.lists(values, min_size=n, max_size=n))) for n in lengths]
    return kwargs


@st.composite
def chaos_kwargs(draw, vocab: int) -> dict:
    """Each argument independently absent, wild, a list of tensors or a list of texts."""
    kwargs = {}
    for name in STEP_ARGS:
        kind = draw(st.sampled_from(["absent", "absent", "None", "wild", "tensors", "texts"]))
        if kind == "absent":
            continue
        if kind == "None":
            kwargs[name] = None
        elif kind == "wild":
            kwargs[name] = draw(wild())
        elif kind == "tensors":
            kwargs[name] = draw(st.lists(a_tensor(token_values(vocab, labels=True)), max_size=3))
        else:
            kwargs[name] = draw(st.lists(a_text(), max_size=3))
    return kwargs


def step_kwargs(vocab: int) -> st.SearchStrategy[dict]:
    return st.one_of(
        text_kwargs(), text_kwargs(), clean_tensor_kwargs(vocab), clean_tensor_kwargs(vocab), tensor_kwargs(vocab),
        chaos_kwargs(vocab),
    )


@STEP_FUZZ
@given(data=st.data())
def test_step_fuzz_works_or_fails_cleanly(trainer, data):
    kwargs = data.draw(step_kwargs(trainer._vocab_size()), label="kwargs")
    check_step(trainer, kwargs)


def _edge_cases(vocab: int) -> list[dict]:
    ids = torch.tensor([5, 6, 7])
    return [
        dict(input_ids=[ids], labels=[torch.tensor([5, 6, vocab + 3])]),
        dict(input_ids=[ids], labels=[torch.tensor([5, -5, 7])]),
        # two updates per call: the bad label may sit in the second (see the test below)
        dict(input_ids=[ids] * 3, labels=[ids, ids, torch.tensor([5, 6, 2**40])]),
        dict(input_ids=[ids], attention_mask=[torch.tensor([0, 0, 0])]),
        dict(input_ids=[ids, ids], attention_mask=[torch.tensor([0, 1, 1]), torch.tensor([1, 1, 0])]),
        dict(input_ids=[ids], labels=[torch.tensor([-100, -100, -100])]),
        dict(texts=["x" * 520], texts_labels=["y" * 10]),  # past GPT-2's 512 positions
        dict(texts=[""], texts_labels=[""]),
        dict(texts=("a", "b"), texts_labels=("c", "d")),
        dict(texts=[b"\xff\xfe"], texts_labels=["x"]),
        dict(texts=["ok"], texts_labels=["\ud800"]),
    ]


@pytest.mark.parametrize("case", range(len(_edge_cases(1))))
def test_step_edge_cases(trainer, case):
    """Hand-picked inputs from the same property, so they run on every test run."""
    check_step(trainer, _edge_cases(trainer._vocab_size())[case])


def test_bad_label_in_a_later_update_changes_nothing(llama_path, tmp_path):
    """Sequential order, one sequence per update: update 1 is valid, update 2 has a bad label.
    Validation must refuse the call before update 1 runs."""
    args = IterativeSFTConfig(
        output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=1, train_sampling_strategy="sequential"
    )
    trainer = IterativeSFTTrainer(
        AutoModelForCausalLM.from_pretrained(llama_path), args, processing_class=AutoTokenizer.from_pretrained(llama_path)
    )
    ids = torch.tensor([5, 6, 7])
    check_step(trainer, dict(input_ids=[ids, ids], labels=[ids, torch.tensor([5, 6, trainer._vocab_size()])]))


# ---------------------------------------------------------------- config fuzz

SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}
HINTS = typing.get_type_hints(RunConfig)
TRAINER_FIELDS = {
    "learning_rate": st.floats(1e-6, 1e-2),
    "per_device_train_batch_size": st.integers(1, 16),
    "gradient_accumulation_steps": st.integers(1, 4),
    "bf16": st.booleans(),
    "seed": st.integers(0, 100),
    "max_length": st.one_of(st.none(), st.integers(1, 512)),
    "warmup_steps": st.integers(0, 10),
}
# Every IterativeSFTConfig field a `trainer:` section may name (output_dir is refused on purpose).
TRAINING_ARGS = {f.name for f in dataclasses.fields(IterativeSFTConfig) if f.init} - {"output_dir"}
HUGE_NUMBERS = [10**400, -(10**400), 10**30, -(10**30), 2**63, -(2**63) - 1, 1e308, -1e308, 5e-324]

WILD_VALUES = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["", "\ud800", "a\udcffb", "x" * 5000, "10", "nan", "true"]),
    st.binary(max_size=4),
    st.booleans(),
    st.none(),
    st.integers(-(10**6), 10**6),
    st.integers(-(10**500), 10**500),
    st.sampled_from(HUGE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0, 0.0, -1, -1.0, -0.0]),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
)
UNKNOWN_KEYS = st.one_of(
    st.text(min_size=1, max_size=8), st.integers(-3, 3), st.none(), st.sampled_from(["\ud800", "x" * 300])
)


def _unwrap(tp):
    """(the type, optional); a union of several types (`int | str`) is their tuple."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tuple(args), type(None) in typing.get_args(tp)
    return tp, False


def valid_value(key: str, tp) -> st.SearchStrategy:
    """A value that must load for field `key` (one of RunConfig's sections)."""
    tp, optional = _unwrap(tp)
    origin = typing.get_origin(tp)
    if key == "data.prompts_file":
        base = st.just("prompts.jsonl")
    elif key == "loop.prompts_per_round":
        base = st.one_of(st.integers(1, 1000), st.just("all"))
    elif key == "data.dataset":
        base = st.just({"path": "prompts_dir", "split": "train"})
    elif key == "data.task":
        base = st.just("addition")
    elif key == "sampling.top_p":
        base = st.floats(0.01, 1.0)
    elif key == "sampling.engine":
        base = st.sampled_from(["hf", "vllm"])
    elif key == "resources.weight_transport":  # "broadcast" depends on other keys (one rank, no LoRA)
        base = st.sampled_from(["auto", "object_store"])
    elif key == "resources.weight_delta":
        base = st.sampled_from(["auto", "off"])
    elif key in ("data.warmup_file", "eval.prompts_file", "eval.dataset", "eval.heldout_fraction"):
        base = st.none()  # a file that must exist / one of three exclusive sources: checked in their own tests
    elif key in ("resources.trainer_gpus", "resources.generator_gpus"):
        base = st.sampled_from([0, 1, 2])  # a share of one GPU depends on other keys (one trainer rank)
    elif key == "algorithm":  # raft also needs a reward_model filter: tests/test_presets.py
        base = st.sampled_from(["rft", "rest_em", "star"])
    elif key == "recipe.train_from":
        base = st.sampled_from(["current", "base"])
    elif key == "recipe.train_on":
        base = st.sampled_from(["round", "all", "last_rounds"])
    elif key == "recipe.hint_template":
        base = st.just("{prompt} ({answer})")
    elif key in ("sampling.until_accepted", "sampling.max_samples"):
        base = st.none()  # both or neither, max_samples >= num_samples: checked in their own tests
    elif key == "eval.final_model":
        base = st.sampled_from(["last", "best"])
    elif key == "eval.best_metric":
        base = st.just("val_greedy")
    elif origin is dict:
        base = st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=2)
    elif origin is list:
        base = st.just([{"name": "exact_answer"}])
    elif tp is bool:
        base = st.booleans()
    elif tp is int:
        base = st.integers(1, 1000)
    elif tp is float:
        base = st.one_of(st.floats(0.01, 1.0), st.integers(1, 1))
    elif tp is str:
        base = st.text(min_size=1, max_size=10)
    else:
        base = st.nothing()
    return st.one_of(base, st.none()) if optional and key != "data.task" else base


DATACLASS_SECTIONS = [name for name, tp in HINTS.items() if dataclasses.is_dataclass(tp)]


@st.composite
def config_dicts(draw):
    """(config dict, paths whose value is valid by construction, whether it must fail).

    A valid config (sections and fields present or left out at random), then 0-3
    mutations: a field's value made wild, an unknown key added (at the top, in a
    section or in `trainer`), a section replaced by a wild value, or a required key
    removed.
    """
    data: dict = {}
    valid: set[str] = set()
    for name in SECTIONS:
        tp = HINTS[name]
        if name != "model" and draw(st.integers(0, 2)) == 0:
            continue
        valid.add(name)
        if dataclasses.is_dataclass(tp):
            section = {}
            hints = typing.get_type_hints(tp)
            for sub in dataclasses.fields(tp):
                key = f"{name}.{sub.name}"
                required = sub.default is dataclasses.MISSING and sub.default_factory is dataclasses.MISSING
                if required or draw(st.booleans()):
                    section[sub.name] = draw(valid_value(key, hints[sub.name]))
                    valid.add(key)
            data[name] = section
        elif name == "trainer":
            keys = draw(st.lists(st.sampled_from(sorted(TRAINER_FIELDS)), max_size=3, unique=True))
            data[name] = {key: draw(TRAINER_FIELDS[key]) for key in keys}
            valid |= {f"trainer.{key}" for key in keys}
        else:  # filters
            data[name] = draw(valid_value(name, tp))

    unknown: list[tuple[str, typing.Any]] = []  # (section or "" for the top, key)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["wild field", "wild field", "unknown key", "wild section", "drop required"]))
        if kind == "wild field":
            name = draw(st.sampled_from([*DATACLASS_SECTIONS, "trainer"]))
            section = data.setdefault(name, {}) if name not in data else data[name]
            if not isinstance(section, dict):
                continue
            fields = sorted(TRAINER_FIELDS) if name == "trainer" else [f.name for f in dataclasses.fields(HINTS[name])]
            sub = draw(st.sampled_from(fields))
            section[sub] = draw(WILD_VALUES)
            valid.discard(f"{name}.{sub}")
        elif kind == "unknown key":
            name = draw(st.sampled_from(["", *DATACLASS_SECTIONS, "trainer"]))
            target = data if not name else data.setdefault(name, {})
            if not isinstance(target, dict):
                continue
            if not name:
                known = set(SECTIONS)
            elif name == "trainer":
                known = TRAINING_ARGS
            else:
                known = {f.name for f in dataclasses.fields(HINTS[name])}
            key = draw(UNKNOWN_KEYS)
            if key in known or key in target:
                continue
            target[key] = draw(WILD_VALUES)
            unknown.append((name, key))
        elif kind == "wild section":
            name = draw(st.sampled_from(sorted(SECTIONS)))
            data[name] = draw(WILD_VALUES)
            valid = {v for v in valid if v != name and not v.startswith(name + ".")}
        else:
            if draw(st.booleans()):
                data.pop("model", None)
                valid = {v for v in valid if v != "model" and not v.startswith("model.")}
            elif isinstance(data.get("model"), dict):
                data["model"].pop("name_or_path", None)
                valid.discard("model.name_or_path")
    # Whether it must fail, from what the dict holds after all mutations (a later one may undo an earlier one).
    must_fail = "model" not in data or (isinstance(data["model"], dict) and "name_or_path" not in data["model"])
    for name, key in unknown:
        container = data.get(name) if name else data
        must_fail |= isinstance(container, dict) and key in container
    data_section = data.get("data")
    if isinstance(data_section, dict) and data_section.get("task", "addition") is None:
        must_fail |= data_section.get("prompts_file") is None and data_section.get("dataset") is None
    return data, valid, must_fail


def key_paths(data, prefix: str = "") -> set[str]:
    paths = set()
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.add(path)
            if not prefix or prefix in SECTIONS:
                paths |= key_paths(value, path)
    return paths


EXTRA_HEADS = {"model", "model.name_or_path", "data.task, data.prompts_file", "data.task, data.dataset",
               "data.prompts_file, data.dataset", "data.dataset.path", "data.dataset.split", "data.dataset.name",
               "data.dataset.streaming", "config"}
# Keys whose value is fine alone but not beside another key's: the error names them rightly.
CROSS_KEY = {"data.system_prompt": lambda data: data.get("data", {}).get("chat_template") is not True}


def well_typed(obj, where: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        tp, optional = _unwrap(typing.get_type_hints(type(obj))[f.name])
        if value is None:
            assert optional, key
        elif dataclasses.is_dataclass(tp):
            well_typed(value, key)
        elif typing.get_origin(tp) in (dict, list):
            assert isinstance(value, typing.get_origin(tp)), key
        elif tp is int:
            assert isinstance(value, int) and not isinstance(value, bool), key
        elif tp is float:
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key
        elif tp in (bool, str):
            assert isinstance(value, tp), key
        elif isinstance(tp, tuple):
            assert isinstance(value, tp), key


@CONFIG_FUZZ
@given(case=config_dicts())
@example(case=({"model": {"name_or_path": "x"}, "sampling": {"temperature": 10**400}}, {"model", "model.name_or_path"}, False))
@example(case=({"model": {"name_or_path": "x"}, "loop": {"rounds": 1.5, 3: None}}, {"model", "model.name_or_path"}, True))
def test_config_fuzz_loads_or_names_the_key(case):
    data, valid, must_fail = case
    try:
        config = load_config(data)
    except (ValueError, TypeError) as e:
        message = str(e)
        heads = [
            p for p in key_paths(data) | EXTRA_HEADS
            if message.startswith(p) and message[len(p) : len(p) + 1] in (":", ",", "[")  # filters[2]: ...
        ]
        assert heads, f"{type(e).__name__} does not start with an offending key path: {message[:300]!r}"
        head = max(heads, key=len)
        if head in CROSS_KEY and CROSS_KEY[head](data):
            return
        assert head not in valid, f"error blames {head!r}, whose value was valid: {message[:300]!r}"
        return
    assert not must_fail, f"loaded a config that has an unknown key or lacks a required one: {data!r}"
    assert isinstance(config, RunConfig)
    well_typed(config)


FLOAT_FIELDS = [
    f"{name}.{f.name}"
    for name, tp in HINTS.items()
    if dataclasses.is_dataclass(tp)
    for f in dataclasses.fields(tp)
    if _unwrap(typing.get_type_hints(tp)[f.name])[0] is float
]


def test_config_huge_ints_for_float_fields():
    """YAML reads 400-digit integer literals as Python ints: a float field must refuse them by key."""
    wrong = []
    for key in FLOAT_FIELDS:
        section, field_name = key.split(".")
        for value in (10**400, -(10**400)):
            try:
                load_config({"model": {"name_or_path": "tiny-llama"}, section: {field_name: value}})
            except (ValueError, TypeError) as e:
                if not str(e).startswith(f"{key}:"):
                    wrong.append(f"{key}: {str(e)[:100]}")
            except Exception as e:  # noqa: BLE001 - any other type is the failure being tested for
                wrong.append(f"{key} = {'-' if value < 0 else ''}10**400: {type(e).__name__}: {e}")
            else:
                wrong.append(f"{key} = {'-' if value < 0 else ''}10**400: loaded")
    assert not wrong, "\n".join(wrong)
