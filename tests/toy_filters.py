"""The filters and selectors that tests name by import string (`"toy_filters:odd_prompts"`).

A filter actor imports the module an import string names, and so does its zygote
(`iterft_ray.verify.processes`): a test module that imports torch, transformers and the
loop costs each of them ~5 s of CPU. This module imports only the standard library.
"""

import os
import time


def odd_prompts(prompt, completion, meta):
    return meta["prompt_id"] % 2 == 1


def even(prompt, completion, meta):
    return meta["prompt_id"] % 2 == 0


def raising_filter(prompt, completion, meta):
    """Fails on every prompt with an even id: those rows must be rejected, the others scored."""
    if meta["prompt_id"] % 2 == 0:
        raise RuntimeError("broken reward model")
    return True


def hint_or_odd(prompt, completion, meta):
    """The model "solves" odd prompts; an even one only with the answer given as a hint."""
    return bool(meta["hinted"]) or meta["prompt_id"] % 2 == 1


def by_sample(prompt, completion, meta):
    """Accepts by prompt class and sample number, whatever the tiny model writes: prompts 3j take every sample
    (done after one wave), 3j+1 take samples 1-3 (a second wave that accepts more than needed), 3j+2 none."""
    s = int(meta["sample_id"].rsplit("-s", 1)[1])
    return [True, s in (1, 2, 3), False][meta["prompt_id"] % 3]


def only_version_zero(prompt, completion, meta):
    """An evaluation filter that passes answers of the untrained weights only: any training is a drop."""
    return meta["weight_version"] == 0


def test_split_only_version_zero(prompt, completion, meta):
    """`only_version_zero` for the test split's prompts (ids below 2000); a validation prompt (2000 on) always
    passes: the test accuracy falls, the validation accuracy does not."""
    return meta["prompt_id"] >= 2000 or meta["weight_version"] == 0


class CrashingSelector:
    """A user's selector whose process dies on every call (as a segfaulting reward model would)."""

    def select(self, table):
        os._exit(1)


class HangingSelector:
    """A user's selector that never answers in time (a reward model waiting on a dead server)."""

    def select(self, table):
        time.sleep(120)


crashing = CrashingSelector()
hanging = HangingSelector()
