"""The recipe presets: `algorithm: rft | raft | rest_em | star` sets config keys the way each paper did.

A preset only fills in keys the config leaves out, so any of them can still be overridden. What
each sets, and the paper it follows, is the README's table "Algorithms".
"""

from __future__ import annotations

import copy
from typing import Any

# Section -> key -> value, for the keys each preset sets (filters: `_preset_filters`).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Expert iteration / rejection-sampling fine-tuning made iterative: go on from the current weights,
    # train on this round's verified samples, distinct completions of a prompt only (Yuan et al. 2023 keep
    # distinct reasoning paths: a `deduplicate` before the filters' cap).
    "rft": {"recipe": {"train_from": "current", "train_on": "round"}},
    # RAFT (Dong et al. 2023): a reward model scores each sample, the best of each prompt's k is kept
    # (a best_of_k selector, k=1 unless given, ties by a hash of loop.seed and the sample), trained on from the
    # current weights.
    "raft": {"recipe": {"train_from": "current", "train_on": "round"}},
    # ReST-EM (Singh et al. 2023): an iteration's E-step samples the whole training set, its M-step fine-tunes
    # the base model on that iteration's samples only, at most 10 a prompt (best_of_k 10 unless a selector
    # is named).
    "rest_em": {"recipe": {"train_from": "base", "train_on": "round"}, "loop": {"prompts_per_round": "all"}},
    # STaR (Zelikman et al. 2022): each outer iteration covers the whole data set, restarts from the base
    # model, trains for 40 updates growing 20% an iteration, and gives each failed problem one hinted retry
    # (the answer as a hint).
    "star": {"recipe": {"train_from": "base", "train_on": "round", "rationalize": True,
                        "hint_template": "(answer: {answer}) {prompt}", "hinted_samples": 1, "steps_first": 40,
                        "steps_growth": 1.2},
             "loop": {"prompts_per_round": "all"}},
}
SELECTORS = {"best_of_k", "top_fraction", "score_threshold", "deduplicate"}


def default_filters(data: dict[str, Any]) -> list[Any]:
    """The run's filters when the config names none: none with `env:` (the environment's reward decides),
    reasoning-gym's own verifiers with `data.reasoning_gym`, else a built-in task's checker."""
    if data.get("env") is not None:
        return []
    source = data.get("data")
    if isinstance(source, dict) and source.get("reasoning_gym") is not None:
        return [{"name": "reasoning_gym"}]
    return [{"name": "exact_answer"}]


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a config as loaded from YAML) with its `algorithm`'s keys filled in where it leaves them out.

    Refuses an unknown algorithm and RAFT without a reward model, naming the key, before anything starts.
    """
    algorithm = data.get("algorithm", "rft")
    if not isinstance(algorithm, str) or algorithm not in PRESETS:
        raise ValueError(f"algorithm: expected one of {sorted(PRESETS)}, got {algorithm!r}")
    data = copy.deepcopy(data)
    for section, values in PRESETS[algorithm].items():
        given = data.get(section)
        if given is None:
            given = data[section] = {}
        if isinstance(given, dict):  # a section of another type is refused by `build`, naming it
            for key, value in values.items():
                given.setdefault(key, value)
    if algorithm == "raft":
        data["filters"] = _raft_filters(data.get("filters"), _seed(data))
        return data
    filters = data["filters"] = data["filters"] if "filters" in data else default_filters(data)
    if algorithm == "rest_em" and isinstance(filters, list) and not any(_filter_name(f) in SELECTORS
                                                                          for f in filters):
        data["filters"] = [*filters, {"name": "best_of_k", "k": 10}]
    return data


def _seed(data: dict[str, Any]) -> int:
    loop = data.get("loop")
    seed = loop.get("seed", 0) if isinstance(loop, dict) else 0
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def rft_filters(filters: list[Any]) -> list[Any]:
    """RFT's filters: a `deduplicate` before the first selector (the cap then counts distinct completions), or
    last when there is none; a list that has one already is left alone. Applied once the user's filters are
    checked (`config.load_config`), so an error names the position the user wrote."""
    if any(_filter_name(f) == "deduplicate" for f in filters):
        return filters
    names = [_filter_name(f) for f in filters]
    at = next((i for i, name in enumerate(names) if name in SELECTORS), len(filters))
    return [*filters[:at], {"name": "deduplicate"}, *filters[at:]]


def _filter_name(spec: Any) -> Any:
    return spec.get("name") if isinstance(spec, dict) else spec


def _raft_filters(filters: Any, seed: int) -> list[Any]:
    """RAFT's filters: the user's, which must hold a reward_model filter; best_of_k (k=1) added when no selector
    follows it; every best_of_k breaks ties by a hash of `seed` (loop.seed) and the sample unless it says."""
    names = [_filter_name(f) for f in filters] if isinstance(filters, list) else []
    if "reward_model" not in names:
        raise ValueError("filters: algorithm: raft scores samples with a reward model; add "
                         "{name: reward_model, model: PATH} (and a selector such as {name: best_of_k, k: 1})")
    after = names[names.index("reward_model") + 1:]
    if not any(name in SELECTORS for name in after):
        filters = [*filters, {"name": "best_of_k", "k": 1}]
    return [{"seed": seed, **f} if isinstance(f, dict) and f.get("name") == "best_of_k" else
            {"name": "best_of_k", "seed": seed} if f == "best_of_k" else f for f in filters]
