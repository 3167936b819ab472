"""The recipe presets: `algorithm: rft | raft | rest_em | star` sets config keys the way each paper did.

A preset only fills in keys the config leaves out, so any of them can still be overridden. What
each sets, and the paper it follows, is the README's table "Algorithms".
"""

from __future__ import annotations

import copy
from typing import Any

# Section -> key -> value, for the keys each preset sets.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Expert iteration / rejection-sampling fine-tuning made iterative: go on from the current weights,
    # train on this round's verified samples (the recipe before presets).
    "rft": {"recipe": {"train_from": "current", "train_on": "round"}},
    # RAFT (Dong et al. 2023): a reward model scores each sample, the best of each prompt's k is kept
    # (a best_of_k selector, k=1 unless given), trained on from the current weights.
    "raft": {"recipe": {"train_from": "current", "train_on": "round"}},
    # ReST-EM (Singh et al. 2023): the M-step fine-tunes the base model each iteration, on the samples
    # of the latest E-step only.
    "rest_em": {"recipe": {"train_from": "base", "train_on": "round"}},
    # STaR (Zelikman et al. 2022): restart from the base model each outer iteration, train on this
    # iteration's rationales, and rationalize failed prompts with the answer given as a hint.
    "star": {"recipe": {"train_from": "base", "train_on": "round", "rationalize": True,
                        "hint_template": "(answer: {answer}) {prompt}"}},
}


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
        data["filters"] = _raft_filters(data.get("filters"))
    return data


def _filter_name(spec: Any) -> Any:
    return spec.get("name") if isinstance(spec, dict) else spec


def _raft_filters(filters: Any) -> list[Any]:
    """RAFT's filters: the user's, which must hold a reward_model filter; best_of_k (k=1) added when no selector follows it."""
    names = [_filter_name(f) for f in filters] if isinstance(filters, list) else []
    if "reward_model" not in names:
        raise ValueError("filters: algorithm: raft scores samples with a reward model; add "
                         "{name: reward_model, model: PATH} (and a selector such as {name: best_of_k, k: 1})")
    selectors = {"best_of_k", "top_fraction", "score_threshold", "deduplicate"}
    after = names[names.index("reward_model") + 1:]
    if not any(name in selectors for name in after):
        return [*filters, {"name": "best_of_k", "k": 1}]
    return list(filters)
