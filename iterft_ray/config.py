"""Run configuration: one dataclass per concern, loaded from YAML and validated once.

Errors name the key the way it is written in the YAML (`sampling.temperature`), so a
user can find the line to fix.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

if typing.TYPE_CHECKING:
    from iterft_ray.storage import StoragePath


# The largest adapter rank vLLM serves (`max_lora_rank`).
VLLM_MAX_LORA_RANK = 512


@dataclass(frozen=True)
class Bound:
    """A range a number field must lie in, kept on the field itself so a rename carries it along.

    `build` checks a given value against its field's bounds, in order, after the type check;
    the error reads "<key>: expected <expected>, got <value>".
    """

    holds: Callable[[float], bool]
    expected: str


POSITIVE = Bound(lambda v: v > 0, "a positive number")
NON_NEGATIVE = Bound(lambda v: v >= 0, "a number >= 0")
AT_MOST_ONE = Bound(lambda v: v <= 1, "a number in (0, 1]")  # after POSITIVE: the interval (0, 1]
IN_ZERO_ONE = Bound(lambda v: 0 < v <= 1, "a number in (0, 1]")
OPEN_UNIT = Bound(lambda v: 0 < v < 1, "a number in (0, 1)")
BELOW_ONE = Bound(lambda v: 0 <= v < 1, "a number in [0, 1)")
NO_END_OR_POSITIVE = Bound(lambda v: v == -1 or v > 0, "-1 (no end) or a positive number")

# The trainer section is TrainingArguments, which accepts a negative learning rate or a batch size
# of 0 and fails, if at all, deep in the trainer actor. These are the fields step() relies on,
# checked at load like the project's own; tests/test_config.py checks each is still a field.
TRAINER_BOUNDS: dict[str, tuple[Bound, ...]] = {
    "learning_rate": (NON_NEGATIVE,),
    "per_device_train_batch_size": (POSITIVE,),
    "gradient_accumulation_steps": (POSITIVE,),
    "max_steps": (NO_END_OR_POSITIVE,),
    "warmup_steps": (NON_NEGATIVE,),
    "weight_decay": (NON_NEGATIVE,),
    "max_grad_norm": (NON_NEGATIVE,),
    "adam_beta1": (BELOW_ONE,),
    "adam_beta2": (BELOW_ONE,),
    "adam_epsilon": (NON_NEGATIVE,),
    "logging_steps": (POSITIVE,),
    "max_length": (POSITIVE,),
}


def bounded(default: Any, *bounds: Bound, help: str | None = None) -> Any:
    """A dataclass field with `default` whose given value `build` checks against `bounds`; `help` says what it is
    (TRL's `metadata={"help": ...}`), for the generated reference."""
    return field(default=default, metadata={"bounds": bounds, **({"help": help} if help else {})})


def positive(default: Any, help: str | None = None) -> Any:
    """A field for a count, size, rate or timeout: a given value must be > 0."""
    return bounded(default, POSITIVE, help=help)


def non_negative(default: Any, help: str | None = None) -> Any:
    """A field where 0 means none (GPUs, retries, warm-up passes): a given value must be >= 0."""
    return bounded(default, NON_NEGATIVE, help=help)


def helped(default: Any, help: str) -> Any:
    """A field with `default` and its help, no bounds."""
    return field(default=default, metadata={"help": help})


@dataclass
class LoraConfig:
    """A LoRA adapter (peft) trained instead of the full model: only its weights train, save and sync.

    `alpha` scales the adapter's update by alpha / r, as in peft's `LoraConfig(lora_alpha=...)`.
    `target_modules` names the linear layers that get an adapter (suffixes of module names, or
    "all-linear" alone).
    """

    r: int = positive(8)
    alpha: float = positive(16.0)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout: expected a number in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"model.lora.target_modules: expected a non-empty list of module names, "
                             f"got {self.target_modules!r}")

    def peft_config(self, is_encoder_decoder: bool = False):
        """The same adapter as peft's `LoraConfig`."""
        import peft

        modules = "all-linear" if self.target_modules == ["all-linear"] else list(self.target_modules)
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=modules,
                               task_type="SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM")


@dataclass
class ModelConfig:
    """Which model to train: a local path, a hub name, or a built-in tiny name (`tiny-llama`)."""

    name_or_path: str
    tokenizer: str | None = None
    trust_remote_code: bool = False
    # Config overrides for built-in tiny models only (e.g. hidden_size: 128).
    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    # Train a LoRA adapter on the model instead of the model itself (null: full fine-tuning).
    lora: LoraConfig | None = None


@dataclass
class ReasoningGymConfig:
    """A reasoning-gym data set (`data.reasoning_gym`, `eval.reasoning_gym`): one task, or a weighted mix of tasks
    through reasoning-gym's `composite` data set. Entry i is generated from `Random(seed + i)`."""

    task: str | None = helped(None, "A reasoning-gym task (`basic_arithmetic`, `chain_sum`, ...); or give tasks.")
    tasks: dict[str, float] | None = helped(None, "A mix instead of one task: {NAME: weight, ...}.")
    size: int = positive(1000, help="How many entries the data set has (entries 0 .. size - 1).")
    seed: int = helped(0, "The data set's seed. Entry i of seed s is entry i - 1 of seed s + 1: give each split "
                          "a seed at least `size` from the others' (training drops any question a split shares).")
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "The task's own config fields (e.g. {max_terms: 2}); with tasks, {NAME: {...}} per task."})

    def check(self, key: str) -> None:
        """What the section's own fields can say wrong, named under `key` (`data.reasoning_gym`, ...); the task
        names and options are reasoning-gym's to check (`iterft_ray.data.reasoning_gym.create`)."""
        if (self.task is None) == (self.tasks is None):
            raise ValueError(f"{key}: give task (one reasoning-gym task) or tasks ({{NAME: weight, ...}}), not both")
        if self.tasks is not None and (not self.tasks or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in self.tasks.values())):
            raise ValueError(f"{key}.tasks: expected {{NAME: positive weight, ...}}, got {self.tasks!r}")
        if self.tasks is not None and not set(self.options) <= set(self.tasks):
            raise ValueError(f"{key}.options: with tasks, options are {{NAME: {{...}}}} per task; "
                             f"{sorted(set(self.options) - set(self.tasks))} are not in tasks")


@dataclass
class DataConfig:
    """Where prompts come from: a built-in task, a JSONL/Parquet file with a `prompt` column, or a dataset."""

    task: str | None = "addition"
    task_options: dict[str, Any] = field(default_factory=dict)
    prompts_file: str | None = None
    # A Hugging Face dataset: {path, name, split, ...}, loaded as datasets.load_dataset(path, name,
    # split=split, **the other keys); path is a local data directory or file, or a hub name.
    dataset: dict[str, Any] | None = None
    prompt_column: str = "prompt"
    # Format prompts with the tokenizer's chat template: each prompt a user message (a `messages`
    # column of a prompts file is used as given), the assistant's turn opened.
    chat_template: bool = False
    # A system message ahead of each prompt's user message (chat_template only).
    system_prompt: str | None = None
    # Demonstrations to warm up on before round 1 (loop.warmup_passes passes): a JSONL file of
    # {"prompt", "completion"} lines; replaces a task's warm-up examples.
    warmup_file: str | None = None
    reasoning_gym: ReasoningGymConfig | None = helped(None, "Prompts from a reasoning-gym data set (rows carry "
                                                      "`answer`, `rg_task`, `rg_seed`, `rg_index`); the default "
                                                      "filters become [reasoning_gym].")

    def __post_init__(self):
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("data.system_prompt: a system message needs a chat template; set data.chat_template: true")
        if self.dataset is not None:
            for key in ("path", "split"):
                if not isinstance(self.dataset.get(key), str) or not self.dataset[key]:
                    raise ValueError(f"data.dataset.{key}: expected a non-empty string, got {self.dataset.get(key)!r} "
                                     "(data.dataset is {path, name, split, ...} as datasets.load_dataset takes them)")
            if self.dataset.get("name") is not None and not isinstance(self.dataset["name"], str):
                raise ValueError(f"data.dataset.name: expected a string, got {self.dataset['name']!r}")
            if self.dataset.get("streaming"):
                raise ValueError("data.dataset.streaming: prompts are always streamed, from the dataset's local "
                                 "Arrow files; remove the key")


@dataclass
class VllmConfig:
    """Options of the vllm engine's `vllm.LLM`, under the names vLLM gives them (`sampling.vllm`).

    Sharing one GPU with the trainer (`resources.trainer_gpus: 0.5`, `generator_gpus: 0.5`): lower
    `gpu_memory_utilization` (the share of the GPU's memory vLLM takes for weights and KV cache, the
    rest left to the trainer) and turn on `enable_sleep_mode`, with which the engine sleeps (level 1:
    weights offloaded to CPU memory, KV cache freed) after each generate call, while the trainer trains,
    and wakes before it loads the next weights or samples. vLLM has sleep mode on CUDA GPUs only.
    """

    gpu_memory_utilization: float = bounded(0.9, IN_ZERO_ONE)
    enable_sleep_mode: bool = False
    # The KV cache's size in bytes, set: on a GPU in place of sizing it by `gpu_memory_utilization`; on CPU,
    # where it is 1 GiB unset, the engine's RAM beyond the weights (it must hold one sequence of the model's
    # `max_position_embeddings` tokens).
    kv_cache_memory_bytes: int | None = positive(None)
    # The longest sequence (prompt + completion) the engine serves; unset, the model's `max_position_embeddings`.
    # A shorter one lets a smaller KV cache hold a sequence (Qwen2.5-0.5B: 12 KiB a token, 384 MiB for 32,768).
    max_model_len: int | None = positive(None)
    enable_prefix_caching: bool = helped(True, "vLLM's automatic prefix caching: KV blocks computed once are reused by "
                                         "later requests with the same prefix (a trajectory's next turn, a prompt's "
                                         "other samples); reset after every weight load.")


@dataclass
class SamplingConfig:
    """Generation settings of the generator actors."""

    num_samples: int = positive(4)
    temperature: float = non_negative(1.0)
    top_p: float = bounded(1.0, IN_ZERO_ONE)
    top_k: int = non_negative(0)
    max_new_tokens: int = positive(16)
    batch_size: int = positive(256)
    # Sequential best-of-n: sample each prompt in waves of num_samples until `until_accepted` samples are
    # accepted or `max_samples` are generated (both or neither).
    until_accepted: int | None = positive(None)
    max_samples: int | None = positive(None)
    # How generators sample: "hf" (transformers generate) or "vllm" (a vLLM engine per generator).
    engine: str = "hf"
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def __post_init__(self):
        # Here, not in load_config, so a SamplingConfig built in Python fails before any actor starts too.
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"sampling.engine: expected 'hf' or 'vllm', got {self.engine!r}")
        if self.engine == "vllm" and self.temperature > 2:
            raise ValueError(f"sampling.temperature: the vllm engine takes at most 2, got {self.temperature}")
        if (self.until_accepted is None) != (self.max_samples is None):
            given, missing = ("until_accepted", "max_samples") if self.max_samples is None else ("max_samples", "until_accepted")
            raise ValueError(f"sampling.{given}: sequential best-of-n needs sampling.{missing} too")
        if self.max_samples is not None and self.max_samples < self.num_samples:
            raise ValueError(f"sampling.max_samples: expected at least sampling.num_samples ({self.num_samples}), "
                             f"got {self.max_samples}")
        if self.engine != "vllm" and self.vllm.enable_sleep_mode:
            raise ValueError(f"sampling.vllm.enable_sleep_mode: sleep mode is the vllm engine's, and sampling.engine "
                             f"is {self.engine!r}; set sampling.engine: vllm")


@dataclass
class ResourcesConfig:
    """How many of each actor, and what each asks Ray for."""

    trainer_ranks: int = positive(1)
    trainer_cpus: float = non_negative(1)
    trainer_gpus: float = non_negative(0)
    num_generators: int = positive(1)
    generator_cpus: float = non_negative(1)
    generator_gpus: float = non_negative(0)
    filter_pool_size: int = positive(1)
    filter_cpus: float = non_negative(0, help="CPUs each filter actor asks Ray for; 0 so a trainer, a generator "
                                      "and a filter fit two cores (a filter mostly waits on its checker's processes "
                                      "or a reward model); give it CPUs when filters compute in the actor.")
    # Actors per reward model (a `reward_model` filter), each holding the model's weights; started
    # only when the filters name one. They ask for no custom resource: the cluster configs have no
    # reward-model node type, so they go wherever their CPUs and GPUs fit.
    num_reward_models: int = positive(1)
    reward_model_cpus: float = non_negative(1)
    reward_model_gpus: float = non_negative(0)
    # On a cluster made from cluster/*.yaml, actors also ask for the `trainer`,
    # `generator`, `filter` and `env` resources so they land on their node types.
    custom_resources: bool = False
    # A generator or filter actor that dies is restarted at most this many times, and a call
    # it was running retried at most max_task_retries times; past either, the run stops and
    # names the actor, its node and its last error. Bounded so that an actor that dies on
    # every call (out of memory loading a snapshot, a selector that crashes) ends the run.
    max_restarts: int = non_negative(3)
    max_task_retries: int = non_negative(3)
    # Seconds for every actor of the run to be placed and started; past it the run stops
    # and names what it asked for and what the cluster has (an autoscaling cluster gets
    # this long to add nodes).
    start_timeout_s: float = positive(600.0)
    # How a new weight version reaches the generators: "object_store" (one `ray.put`; a generator on
    # another node pulls the whole snapshot), "broadcast" (the trainer broadcasts it in buckets over a
    # torch.distributed group with the generators: Gloo on CPU, NCCL when all have GPUs), or "auto":
    # broadcast when a generator is on another node than the trainer, and the trainer is one rank.
    weight_transport: str = "auto"
    num_env_workers: int = positive(1, help="Environment actors (`env:` runs only): each hosts one environment "
                                    "instance per process, one process per trajectory in flight.")
    env_cpus: float = non_negative(0, help="CPUs each environment actor asks Ray for; 0 so the small configs fit "
                                   "two cores (its processes mostly wait on the engine).")
    # "auto": a new weight version travels as what changed since the version before (a `WeightDelta`: the
    # changed elements' indices and values in the engines' dtype) to a generator that holds exactly that
    # version in memory of its own: every generator of the broadcast, and on the object store a generator
    # on a GPU; the rest, and a generator new, restarted or behind, load the whole version. "off": whole
    # versions only.
    weight_delta: str = "auto"

    def __post_init__(self):
        for key in ("trainer_gpus", "generator_gpus", "reward_model_gpus"):
            gpus = getattr(self, key)
            if gpus > 1 and not float(gpus).is_integer():
                raise ValueError(f"resources.{key}: expected a share of one GPU (0.5: a trainer and a generator on "
                                 f"one GPU) or a whole number of GPUs, got {gpus:g}")
        if self.trainer_ranks > 1 and 0 < self.trainer_gpus < 1:
            raise ValueError(f"resources.trainer_gpus: {self.trainer_gpus:g} of a GPU per rank would put "
                             f"{self.trainer_ranks} ranks (resources.trainer_ranks) on one GPU; a shared GPU takes "
                             f"one trainer rank")
        if self.weight_transport not in ("auto", "object_store", "broadcast"):
            raise ValueError(f"resources.weight_transport: expected 'auto', 'object_store' or 'broadcast', "
                             f"got {self.weight_transport!r}")
        if self.weight_delta not in ("auto", "off"):
            raise ValueError(f"resources.weight_delta: expected 'auto' or 'off', got {self.weight_delta!r}")
        if self.weight_transport == "broadcast" and self.trainer_ranks != 1:
            raise ValueError(f"resources.weight_transport: 'broadcast' sends from a trainer of one rank (a sharded "
                             f"trainer's ranks hold parts only); got resources.trainer_ranks: {self.trainer_ranks}. "
                             f"Use 'object_store' or 'auto'")


@dataclass
class LoopConfig:
    """The rounds: how many, how big, what is recorded."""

    rounds: int = positive(10)
    prompts_per_round: int | str = helped(256, "Prompts each round samples, or 'all': one pass over every prompt not "
                                               "held out, in the validation split or set aside (ReST-EM's and "
                                               "STaR's iteration).")
    async_mode: bool = False
    max_staleness: int = positive(1)
    eval_every: int = positive(1)
    save_every: int = positive(5)
    output_dir: str = "runs/iterft"
    seed: int = 0
    filter_timeout_s: float = positive(10.0)
    # Passes of supervised warm-up over the task's warm-up examples before round 1.
    warmup_passes: int = non_negative(0)
    # A round in which at least this share of rows failed in a filter stops the run.
    max_filter_error_rate: float = bounded(1.0, POSITIVE, AT_MOST_ONE)
    # A round (generate, filter, train, sync, held-out check; not the checkpoint save) not
    # done in this many seconds stops the run, naming the actors it still waits for.
    round_timeout_s: float = positive(3600.0)

    def __post_init__(self):
        per_round = self.prompts_per_round
        if per_round != "all" and (isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1):
            raise ValueError(f"loop.prompts_per_round: expected a positive int or 'all', got {per_round!r}")


@dataclass
class ValidationConfig:
    """The validation split (`eval.validation`): what the rollback gate, the best checkpoint and
    `eval.final_model: best` select on, so that the test split's numbers are not selected on. One source."""

    prompts_file: str | None = helped(None, "A JSONL / Parquet prompts file, as data.prompts_file.")
    dataset: dict[str, Any] | None = helped(None, "A dataset, as data.dataset: {path, name, split, ...}.")
    fraction: float | None = bounded(None, OPEN_UNIT, help="This share of the training prompts, set aside by a "
                                     "seeded rule apart from eval.heldout_fraction's; never trained on.")
    reasoning_gym: ReasoningGymConfig | None = helped(None, "A reasoning-gym data set, as data.reasoning_gym, with "
                                                      "a seed of its own.")

    def __post_init__(self):
        given = [k for k in ("prompts_file", "dataset", "fraction", "reasoning_gym") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"eval.validation: expected one of prompts_file, dataset, fraction, reasoning_gym; "
                             f"got {given or 'none'}")


@dataclass
class EvalConfig:
    """Evaluation every loop.eval_every rounds, before round 1 and after the last: held-out prompts graded by verifiers.

    The prompts come from `prompts_file` or `dataset` (as data.prompts_file / data.dataset take them), or
    `heldout_fraction` of the training prompts (set aside by a seeded rule, never trained on; at most
    `max_prompts` of them), else from the task's held-out split; `filters` grade them (default: the run's row filters, its selectors
    left out). Each prompt is answered once greedily (`eval_greedy`) and `num_samples` times at the run's
    temperature (`eval_pass@k` for k = 1..n, `eval_maj@n`).
    """

    prompts_file: str | None = None
    dataset: dict[str, Any] | None = None
    reasoning_gym: ReasoningGymConfig | None = helped(None, "Evaluation prompts from a reasoning-gym data set (its "
                                                      "own seed); a question training also drew is dropped from "
                                                      "training.")
    heldout_fraction: float | None = bounded(None, OPEN_UNIT)
    max_prompts: int = positive(512)
    filters: list[Any] | None = None
    num_samples: int = non_negative(4)
    validation: ValidationConfig | None = helped(None, "The split selection reads (val_* metrics); without it (nor "
                                                 "a task's num_validation) no best is tracked.")
    best_metric: str = helped("val_greedy", "The validation metric that makes a checkpoint the best one (a new best "
                                            "is checkpointed when it is evaluated): val_greedy, val_score_mean, "
                                            "val_pass@k, val_maj@n.")
    rollback_drop: float | None = non_negative(None, help="Restore the best checkpoint when best_metric falls more "
                                                          "than this below its best (None: never). Needs a "
                                                          "validation split.")
    final_model: str = helped("last", "What final/ holds at the end: the 'last' weights or the 'best' "
                                      "checkpoint's (needs a validation split).")

    def __post_init__(self):
        given = [k for k in ("prompts_file", "dataset", "reasoning_gym", "heldout_fraction")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{', '.join('eval.' + k for k in given)}: evaluation prompts come from one of them; "
                             "remove the others")
        if self.final_model not in ("last", "best"):
            raise ValueError(f"eval.final_model: expected 'last' or 'best', got {self.final_model!r}")
        known = ["val_greedy", "val_score_mean"] + [f"val_pass@{k}" for k in range(1, self.num_samples + 1)]
        known += [f"val_maj@{self.num_samples}"] if self.num_samples else []
        if self.best_metric not in known:
            raise ValueError(f"eval.best_metric: expected one of {known} (eval.num_samples is {self.num_samples}): "
                             f"selection reads the validation split (eval.validation), never the test split; "
                             f"got {self.best_metric!r}")


@dataclass
class RecipeConfig:
    """Where each round trains from and on what (ReST-EM, STaR), and STaR's hinted second pass.

    `train_from`: "current" (each round goes on from the weights the last one made) or "base" (each
    round restarts from the weights round 1 started from, with fresh fp32 masters and optimizer state;
    weight versions still advance). `train_on`: "round" (this round's accepted samples), "all" (every
    round's so far, deduplicated) or "last_rounds" (the last `last_rounds` rounds'). `epochs`: passes
    over that training set per round. `rationalize` (STaR): prompts with no accepted sample get a
    second pass with `hint_template` (its `{prompt}` and `{answer}` filled in) as the prompt; hinted
    completions that verify train as (the prompt without the hint, the completion).
    """

    train_from: str = "current"
    train_on: str = "round"
    last_rounds: int = positive(1)
    epochs: int = positive(1)
    rationalize: bool = False
    hint_template: str = "{prompt}"
    hinted_samples: int | None = positive(None, help="Samples of each failed prompt's hinted pass (STaR: 1); "
                                                     "None: sampling.num_samples.")
    steps_first: int | None = positive(None, help="Updates the first round trains for (STaR: 40), passing over "
                                                  "its training set as often as that takes; None: recipe.epochs "
                                                  "passes.")
    steps_growth: float = positive(1.0, help="Each round trains this many times the updates of the one before "
                                             "(STaR: 1.2), with steps_first.")

    def __post_init__(self):
        if self.train_from not in ("current", "base"):
            raise ValueError(f"recipe.train_from: expected 'current' or 'base', got {self.train_from!r}")
        if self.train_on not in ("round", "all", "last_rounds"):
            raise ValueError(f"recipe.train_on: expected 'round', 'all' or 'last_rounds', got {self.train_on!r}")
        if self.rationalize and "{prompt}" not in self.hint_template:
            raise ValueError(f"recipe.hint_template: expected a template with {{prompt}} (and {{answer}}), "
                             f"got {self.hint_template!r}")


@dataclass
class CurriculumConfig:
    """Prompts set aside by their pass-rate record: solved (every sample accepted) in each of their last
    `solved_rounds` rounds, or never accepted after `max_attempts` samples; `bring_back` returns them when
    the epoch (a pass over the prompts) ends. None: that rule is off."""

    solved_rounds: int | None = positive(None)
    max_attempts: int | None = positive(None)
    bring_back: bool = True


TRAIN_TURNS = ("all", "last")


@dataclass
class EnvConfig:
    """A multi-turn environment (`iterft_ray.envs`): each prompt becomes a trajectory of assistant turns and
    environment observations, accepted when the environment's reward reaches `min_score`."""

    name: str = field(metadata={"help": "A built-in environment (calculator, retry, python_tool), an import string "
                                        "`package.module:Class`, or `skyrl_gym:<id>` from SkyRL-gym's registry."})
    config: dict[str, Any] = field(default_factory=dict,
                                   metadata={"help": "Passed to the environment as its `env_config`."})
    max_turns: int = positive(4, help="Assistant turns per trajectory at most; also the environment's `max_turns` "
                                      "extra where the prompt row gives none.")
    turn_timeout_s: float = positive(30.0, help="Seconds an environment's `init`, `step` or `close` may take; past "
                                                "it its process is killed and the trajectory ends with `env_error`.")
    min_score: float = helped(1.0, "A trajectory is accepted when its `env_reward` (the sum of its step rewards) is "
                                   "at least this, it has no `env_error` and is not `truncated`.")
    train_turns: str = helped("all", "`all`: every assistant turn is trained; `last`: only the final one.")
    groups: int = positive(4, help="The trajectories of a generator call advance in this many groups, in a fixed "
                                   "order: while one group's environments step, the engine samples another's turns. "
                                   "1: turn-synchronous.")

    def __post_init__(self):
        if self.train_turns not in TRAIN_TURNS:
            raise ValueError(f"env.train_turns: expected 'all' or 'last', got {self.train_turns!r}")


@dataclass
class RunConfig:
    """Everything one iterative fine-tuning run needs."""

    model: ModelConfig
    # The recipe preset (`iterft_ray.presets`): rft | raft | rest_em | star; the keys it sets can be overridden.
    algorithm: str = "rft"
    data: DataConfig = field(default_factory=DataConfig)
    filters: list[Any] = field(default_factory=lambda: [{"name": "exact_answer"}])
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Any IterativeSFTConfig / TrainingArguments field (learning_rate, bf16, ...).
    trainer: dict[str, Any] = field(default_factory=dict)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    # A multi-turn environment (None: single-turn rounds).
    env: EnvConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, checking keys, types and the ranges its fields carry (`bounded`)."""
    if not isinstance(data, dict):
        raise TypeError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ValueError(f"{_join(where, key)}: unknown key (expected one of {sorted(known)})")
    values = {}
    for name, f in known.items():
        key = _join(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{key}: required")
            continue
        values[name] = _coerce(hints[name], data[name], key)
        for bound in f.metadata.get("bounds", ()) if values[name] is not None else ():
            if not bound.holds(values[name]):
                raise ValueError(f"{key}: expected {bound.expected}, got {values[name]}")
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        kinds = [t for t in options if t is not type(None)]
        if len(kinds) > 1:  # `int | str`: the first that takes the value
            for kind in kinds:
                try:
                    return _coerce(kind, value, key)
                except TypeError:
                    continue
            raise TypeError(f"{key}: expected {' or '.join(getattr(t, '__name__', str(t)) for t in kinds)}, "
                            f"got {type(value).__name__} {value!r}")
        tp = kinds[0]
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{key}: expected a list, got {type(value).__name__}")
        return list(value)
    if tp is float and isinstance(value, str):
        value = _yaml_float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise TypeError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is float:
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{key}: expected a finite number, got an integer too large for a float") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{key}: expected a finite number, got {value}")
    return value


def _yaml_float(text: str) -> float | str:
    """`text` as a float when it spells one ("1e-3"), else unchanged for the type error to name."""
    try:
        return float(text)
    except ValueError:
        return text


# What may differ between a run's saved config.yaml and the config that resumes it: how
# long it goes on and how often it evaluates and saves, never what it trains on or how.
CHANGEABLE_ON_RESUME = ("loop.rounds", "loop.eval_every", "loop.save_every", "loop.output_dir", "eval.final_model",
                        "loop.round_timeout_s", "resources.max_restarts", "resources.max_task_retries",
                        "resources.start_timeout_s")


BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def builtin_configs() -> list[str]:
    """The names of the built-in configs (`demo`, `tiny`), which the CLI and `load_config` take for a path."""
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a built-in config (`demo`, `tiny`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = BUILTIN_CONFIGS / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    raise ValueError(f"config: {str(name_or_path)!r} is neither a file nor a built-in config {builtin_configs()}")


def load_config(source: str | Path | dict[str, Any]) -> RunConfig:
    """Load a RunConfig from a YAML file, a built-in config's name or a dict; errors name the offending key.

    Input paths in a YAML file (model, tokenizer, prompts file) are relative to the file.
    """
    data = source
    if not isinstance(source, dict):
        source = resolve_config(source)
        with open(source, encoding="utf-8") as f:
            data = resolve_input_paths(yaml.safe_load(f), Path(source).parent)
    from iterft_ray.presets import apply_preset, rft_filters

    data = apply_preset(data) if isinstance(data, dict) else data
    config = build(RunConfig, data)
    sources = [k for k in ("prompts_file", "dataset", "reasoning_gym") if getattr(config.data, k) is not None]
    if len(sources) > 1:
        raise ValueError(f"{', '.join('data.' + k for k in sources)}: prompts come from one of them; remove the "
                         "others")
    source = sources[0] if sources else "dataset"
    if getattr(config.data, source) is not None and config.data.task is not None:
        if "task" in data["data"]:
            raise ValueError(
                f"data.task, data.{source}: prompts come from a task or from a {source.replace('_', ' ')}, not both; "
                f"remove one (set data.task: null to use the {source.replace('prompts_', '')})"
            )
        config.data.task = None  # the default task gives way to a prompts file or a dataset
    if config.data.task is None and not sources:
        raise ValueError("data.task, data.prompts_file: give one of them (or data.dataset, data.reasoning_gym)")
    if config.env is not None:
        _check_env(config)
    _check_reasoning_gym(config)
    _check_warmup_file(config)
    config.trainer = check_trainer_args(config.trainer)
    _check_packing(config)
    _check_filters(config.filters)
    if config.algorithm == "rft" and config.env is None:
        config.filters = rft_filters(config.filters)
    if config.eval.filters is not None:
        _check_filters(config.eval.filters, "eval.filters")
        _check_eval_reward_models(config)
    check_lora_serving(config.model.lora, config.sampling)
    _check_lora_transport(config)
    _check_trackers(config.trainer)
    return config


def _check_env(config: RunConfig) -> None:
    """`env:` needs a chat template and a causal model, and no hinted pass; its name must resolve to an
    environment. (With `env:` the filters default to none: `presets.default_filters`.)"""
    from iterft_ray.envs.protocol import resolve_env

    if not config.data.chat_template:
        raise ValueError("env: a multi-turn environment renders its turns with the chat template; "
                         "set data.chat_template: true")
    if config.recipe.rationalize:
        raise ValueError("recipe.rationalize: STaR's hinted pass is for single-turn prompts; with env: set "
                         "recipe.rationalize: false (or algorithm: rft)")
    if _is_seq2seq(config.model.name_or_path):
        raise ValueError(f"env: trajectories are sampled turn by turn from a causal LM; {config.model.name_or_path} "
                         "is a seq2seq model")
    try:
        resolve_env(config.env.name)
    except Exception as e:  # a user's environment module may raise anything while importing
        raise ValueError(f"env.name: {e}") from None


def _check_reasoning_gym(config: RunConfig) -> None:
    """Each reasoning-gym section names tasks and options reasoning-gym takes (it builds the data set once here;
    with data.reasoning_gym the filters default to [reasoning_gym], its own verifiers: `presets.default_filters`)."""
    from iterft_ray.data.reasoning_gym import create

    validation = config.eval.validation.reasoning_gym if config.eval.validation is not None else None
    for key, spec in (("data.reasoning_gym", config.data.reasoning_gym),
                      ("eval.reasoning_gym", config.eval.reasoning_gym),
                      ("eval.validation.reasoning_gym", validation)):
        if spec is not None:
            spec.check(key)
            create(spec, key)


def _is_seq2seq(name: str) -> bool | None:
    """Whether model `name` is seq2seq, where its config is at hand (a built-in tiny model, a local directory)."""
    import json

    from iterft_ray.tiny import TINY_CONFIGS

    if name in TINY_CONFIGS:
        return TINY_CONFIGS[name]["model_type"] == "t5"
    if (Path(name).expanduser() / "config.json").is_file():
        return bool(json.loads((Path(name).expanduser() / "config.json").read_text()).get("is_encoder_decoder"))
    return None


def _check_packing(config: RunConfig) -> None:
    """`trainer.packing` is for causal LMs: with a seq2seq model it is refused here when the model's config
    is at hand (a built-in tiny model, a local directory), else by the trainer once it has loaded the model."""
    if not config.trainer.get("packing"):
        return
    name = config.model.name_or_path
    if _is_seq2seq(name):
        raise ValueError(f"trainer.packing: only for causal LMs; {name} is a seq2seq model, which keeps padding "
                         "(set packing: false)")


def _check_warmup_file(config: RunConfig) -> None:
    """A warm-up file must hold demonstrations, and the run must warm up on them; refused here, by key."""
    from iterft_ray.data.warmup import load_warmup_file

    if config.data.warmup_file is None:
        return
    if not config.loop.warmup_passes:
        raise ValueError("data.warmup_file: demonstrations to warm up on, but loop.warmup_passes is 0; "
                         "set loop.warmup_passes: 1 or more")
    try:
        examples = load_warmup_file(config.data.warmup_file)
    except ValueError as e:
        raise ValueError(f"data.warmup_file: {e}") from None
    if not config.data.chat_template and any("messages" in e for e in examples):
        raise ValueError("data.warmup_file: conversations ({\"messages\": [...]}) are rendered with the chat "
                         "template; set data.chat_template: true")


def check_lora_serving(lora: LoraConfig | None, sampling: SamplingConfig) -> None:
    """Refuse an adapter the sampling engine cannot serve, before any actor starts.

    Public because configs built in Python (`RayIterativeSFTTrainer`) skip `load_config`.
    """
    if lora is not None and sampling.engine == "vllm" and lora.r > VLLM_MAX_LORA_RANK:
        raise ValueError(f"model.lora.r: sampling.engine: vllm serves adapters of rank up to {VLLM_MAX_LORA_RANK}, "
                         f"got {lora.r}")


def _check_lora_transport(config: RunConfig) -> None:
    """A LoRA version is its adapter alone, which only the object store moves; refused at load, not in an actor."""
    if config.model.lora is not None and config.resources.weight_transport == "broadcast":
        raise ValueError("model.lora, resources.weight_transport: a LoRA version is its adapter, a few MB that "
                         "the object store moves; 'broadcast' sends full weights. Use 'auto' or 'object_store'")


def report_to_list(report_to: Any) -> list[str]:
    """`trainer.report_to` as the list of integrations it means, read as TrainingArguments reads it
    ("none" and no value: none; "all": every one installed)."""
    if report_to is None or report_to in ("none", ["none"]):
        return []
    if report_to in ("all", ["all"]):
        from transformers.integrations import get_available_reporting_integrations

        return get_available_reporting_integrations()
    names = [report_to] if isinstance(report_to, str) else report_to
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"trainer.report_to: expected an integration name or a list of them "
                         f"(wandb, mlflow, tensorboard, ...), got {report_to!r}")
    return list(names)


def _check_trackers(trainer: dict[str, Any]) -> None:
    """The trackers the driver logs to (wandb, mlflow) must be installed, and MLflow must know where to write."""
    import importlib.util

    names = report_to_list(trainer.get("report_to"))
    for name in ("wandb", "mlflow"):
        if name in names and importlib.util.find_spec(name) is None:
            raise ValueError(f"trainer.report_to: {name!r} needs the {name} package; "
                             f"pip install 'iterft_ray[trackers]'")
    if "mlflow" not in names:
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and importlib.util.find_spec("sqlalchemy") is None:
        raise ValueError("trainer.report_to: 'mlflow' needs MLFLOW_TRACKING_URI (a tracking server's http(s):// "
                         "address, or file:///a/dir with MLFLOW_ALLOW_FILE_STORE=true; mlflow-skinny has no "
                         "default SQLite store)")
    from mlflow import MlflowClient

    try:
        MlflowClient()  # opens the tracking store: a file store MLflow refuses, a bad scheme
    except Exception as e:  # MlflowException, or whatever the store's own client raises
        raise ValueError(f"trainer.report_to: mlflow cannot use MLFLOW_TRACKING_URI={uri!r}: "
                         f"{' '.join(str(e).split())}") from None


def resolve_input_paths(data: Any, base: Path) -> Any:
    """Make the relative input paths of a config file's data absolute against `base`, the file's directory.

    `data.prompts_file`, `data.warmup_file`, `eval.prompts_file` and `eval.validation.prompts_file` always; `model.name_or_path`,
    `model.tokenizer`, `data.dataset.path` and a `reward_model` filter's `model` when they name something
    beside the file (else they are a hub id or a built-in name). `loop.output_dir` stays relative to the working directory, as built-in
    configs and TrainingArguments have it.
    """
    if not isinstance(data, dict):
        return data
    sections = {"data": ("prompts_file", "warmup_file"), "eval": ("prompts_file",),
                "model": ("name_or_path", "tokenizer")}
    for name, keys in sections.items():
        section = data.get(name)
        if not isinstance(section, dict):
            continue
        for key in keys:
            value = section.get(key)
            if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
                continue
            beside = base / value
            if key in ("prompts_file", "warmup_file") or value.startswith(("./", "../")) or beside.exists():
                section[key] = str(beside.resolve())
    for name in ("filters", "eval"):  # a reward model's directory beside the file
        section = data.get("eval") if name == "eval" else None
        specs = data.get(name) if name == "filters" else section.get("filters") if isinstance(section, dict) else None
        for spec in specs if isinstance(specs, list) else []:
            path = spec.get("model") if isinstance(spec, dict) and spec.get("name") == "reward_model" else None
            if isinstance(path, str) and path and not Path(path).expanduser().is_absolute():
                if path.startswith(("./", "../")) or (base / path).exists():
                    spec["model"] = str((base / path).resolve())
    evaluation = data.get("eval") if isinstance(data.get("eval"), dict) else {}
    validation = evaluation.get("validation") if isinstance(evaluation.get("validation"), dict) else {}
    if isinstance(validation.get("prompts_file"), str) and validation["prompts_file"]:
        validation["prompts_file"] = str((base / Path(validation["prompts_file"]).expanduser()).resolve())
    for section in (data.get("data"), evaluation, validation):
        dataset = section.get("dataset") if isinstance(section, dict) else None
        if isinstance(dataset, dict) and isinstance(dataset.get("path"), str) and dataset["path"]:
            path = dataset["path"]
            if not Path(path).expanduser().is_absolute() and (path.startswith(("./", "../")) or (base / path).exists()):
                dataset["path"] = str((base / path).resolve())
    return data


class ConfigWarning(UserWarning):
    """A config that runs, but likely not as meant (a reward filter no selector follows, prompts repeated)."""


def _check_filters(filters: list[Any], key: str = "filters") -> None:
    """Build each filter spec once here, so a bad one fails at load, before any actor starts.

    A row filter declared to return a number only adds to the score: with no selector after it,
    every row it scores stays accepted, which is warned about.
    """
    from iterft_ray.verify.filters import resolve_filter, returns_number, selects_by_score
    from iterft_ray.verify.reward_model import RewardModel

    resolved = []
    for i, spec in enumerate(filters):
        try:
            resolved.append(resolve_filter(spec))
        except Exception as e:  # a user's filter module may raise anything while importing
            raise ValueError(f"{key}[{i}]: {e}") from e
    selected = [selects_by_score(f) for f in resolved]
    for i, f in enumerate(resolved):
        numeric = returns_number(f) or isinstance(f, RewardModel)
        if key == "filters" and numeric and not any(selected[i + 1:]):
            warnings.warn(f"filters[{i}]: a numeric filter adds to each row's score and rejects no row; without a "
                          f"selector after it (best_of_k, top_fraction, score_threshold) every row it scores is "
                          f"trained on", ConfigWarning, stacklevel=3)


def _check_eval_reward_models(config: RunConfig) -> None:
    """Reward-model actors start for the run's filters; an evaluation can score only with those."""
    from iterft_ray.verify.filters import resolve_filter
    from iterft_ray.verify.reward_model import RewardModel

    served = [f for f in map(resolve_filter, config.filters) if isinstance(f, RewardModel)]
    for i, spec in enumerate(config.eval.filters):
        model = resolve_filter(spec)
        if isinstance(model, RewardModel) and model not in served:
            raise ValueError(f"eval.filters[{i}]: reward model {model.model} is not among the run's filters; "
                             "reward-model actors start for those only, so name the same model (and options) "
                             "in filters")


def check_trainer_args(trainer: dict[str, Any]) -> dict[str, Any]:
    """`trainer:` holds IterativeSFTConfig fields; a misspelt or mistyped one is an error here, not deep in an actor.

    Values of plain bool / int / float / str fields (optional or not) are checked like the
    other sections', those in TRAINER_BOUNDS against their bounds, enums (`lr_scheduler_type`,
    `optim`) against their values; then the whole section is built as IterativeSFTConfig once,
    so what TrainingArguments itself refuses fails here too.
    """
    from iterft_ray.train.refused_args import refused_arg
    from iterft_ray.train.trainer import IterativeSFTConfig

    hints = typing.get_type_hints(IterativeSFTConfig)
    known = {f.name for f in dataclasses.fields(IterativeSFTConfig) if f.init}
    checked = {}
    for key, value in trainer.items():
        if key not in known:
            raise ValueError(f"trainer.{key}: unknown key (expected an IterativeSFTConfig / TrainingArguments field)")
        options = [t for t in typing.get_args(hints[key]) or (hints[key],) if t is not type(None)]
        plain = len(options) == 1 and options[0] in (bool, int, float, str)
        checked[key] = _coerce(hints[key], value, f"trainer.{key}") if plain else value
        for bound in TRAINER_BOUNDS.get(key, ()):
            if checked[key] is not None and not bound.holds(checked[key]):
                raise ValueError(f"trainer.{key}: expected {bound.expected}, got {checked[key]}")
        _check_enum(options, checked[key], f"trainer.{key}")
        reason = refused_arg(key, checked[key])
        if reason:
            raise ValueError(reason)
    if "output_dir" in trainer:
        raise ValueError("trainer.output_dir: set loop.output_dir instead; the trainer writes under it")
    # Built as on a CPU: the driver may have no GPU where the trainer has one (bf16, tf32 are the trainer node's).
    on_driver = {k: v for k, v in checked.items() if k != "tf32"}
    try:
        IterativeSFTConfig(**{"output_dir": "unused", **on_driver, "report_to": "none", "use_cpu": True})
    except (ValueError, TypeError) as e:  # a combination TrainingArguments refuses
        raise ValueError(f"trainer: {' '.join(str(e).split())}") from None
    return checked


def _check_enum(options: list[Any], value: Any, key: str) -> None:
    """A TrainingArguments field typed `SomeEnum | str` takes the enum's values only."""
    import enum

    for option in options:
        if isinstance(option, type) and issubclass(option, enum.Enum) and isinstance(value, str):
            values = [m.value for m in option]
            if value not in values:
                raise ValueError(f"{key}: expected one of {values}, got {value!r}")


def save_config(config: RunConfig, path: str | Path | StoragePath) -> None:
    """Write the resolved config, loadable again with `load_config` (a local path or a store, see storage.py)."""
    from iterft_ray.storage import StoragePath

    StoragePath.of(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def check_model_sources(model: ModelConfig) -> None:
    """`model.name_or_path` and `model.tokenizer` must be a local directory, a built-in tiny name or a hub id.

    Found on the driver before Ray starts, not as a transformers error deep in an actor.
    A hub id is checked against the local hub cache, then, unless HF_HUB_OFFLINE is set,
    against the hub itself.
    """
    from iterft_ray.tiny import TINY_CONFIGS

    for key, value in (("model.name_or_path", model.name_or_path), ("model.tokenizer", model.tokenizer)):
        if value is None or value in TINY_CONFIGS or Path(value).expanduser().is_dir():
            continue
        expected = f"expected a local model directory, a built-in tiny model {sorted(TINY_CONFIGS)} or a hub id"
        if Path(value).expanduser().exists() or value.startswith(("/", "./", "../", "~")) or value.count("/") > 1:
            raise ValueError(f"{key}: {value} is not a directory; {expected}")
        _check_hub_id(key, value, expected)


@functools.lru_cache(maxsize=None)  # asked again by RayIterativeSFTTrainer after the CLI's start check: one probe
def _check_hub_id(key: str, repo_id: str, expected: str) -> None:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{key}: {repo_id!r} is not a local directory nor a valid hub id; {expected}") from None
    if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in ("config.json", "tokenizer_config.json")):
        return
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{key}: {repo_id!r} is not a local directory and not in the hub cache "
                         f"(HF_HUB_OFFLINE is set); {expected}")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # it exists; loading it needs the user's token, which from_pretrained reads
    except RepositoryNotFoundError:
        raise ValueError(f"{key}: no model {repo_id!r} on the hub (a private one needs `hf auth login`) "
                         f"nor a local directory; {expected}") from None
    except Exception as e:  # no network, a proxy, a timeout: whatever the HTTP client raises
        raise ValueError(f"{key}: {repo_id!r} is not a local directory and the hub cannot be reached to find it "
                         f"({type(e).__name__}); {expected}") from None
