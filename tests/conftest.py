"""Shared fixtures: tiny models built once per session, loaded through from_pretrained."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from iterft_ray.tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: str(build_tiny_model(name, root / name)) for name in ("tiny-llama", "tiny-gpt2", "tiny-t5")}


@pytest.fixture(scope="session")
def llama_path(tiny_paths):
    return tiny_paths["tiny-llama"]


@pytest.fixture(scope="session")
def t5_path(tiny_paths):
    return tiny_paths["tiny-t5"]
