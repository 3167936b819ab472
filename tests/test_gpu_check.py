"""jobs/gpu_check.py: its path runs without Ray and vLLM (here on the CPU, a tiny model), and without CUDA it
stops with one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run in a fresh interpreter where `import ray` and `import vllm` fail as if they were not installed,
# through the functions gpu_check.main() calls, with the model on the CPU instead of CUDA.
NO_RAY_RUN = r"""
import json, sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "vllm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
sys.path.insert(0, "jobs")
import gpu_check

versions = gpu_check.require_packages()
path = gpu_check.build_llama(sys.argv[1] + "/model", hidden_size=32, intermediate_size=64)
seqs = gpu_check.ragged_sequences(6, 4, 40, vocab=260)
train = {side: gpu_check.train_figures(path, "cpu", packing=side == "packed", bf16=True, sequences=seqs,
                                       micro_batch=3, steps=1, out_dir=sys.argv[1] + "/" + side, peak_flops=1e12)
         for side in ("padded", "packed")}
sampling = gpu_check.sampling_figures(path, prompts=2, num_samples=2, max_new_tokens=6)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "vllm"))
figures = {"gpu": "cpu", "versions": versions, "train": train, "sampling": sampling, "wall_s": 1.0}
lines = [gpu_check.figures_line(figures)]
for side in train.values():
    side.update(mfu=None, max_memory_gb=None)  # a GPU not in the table, as on the CPU
lines.append(gpu_check.figures_line(figures))
print(json.dumps({"train": train, "sampling": sampling, "loaded": loaded, "lines": lines}))
"""


def no_cuda_env():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the same answer on a machine with a GPU


def test_gpu_check_path_runs_without_ray_or_vllm(tmp_path):
    out = subprocess.run([sys.executable, "-c", NO_RAY_RUN, str(tmp_path)], cwd=ROOT, env=no_cuda_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["loaded"] == []
    assert all(line.startswith("gpu_check OK: cpu, Llama 0.00B") and "\n" not in line for line in figures["lines"])
    assert "MFU" in figures["lines"][0] and "TFLOP/s" in figures["lines"][1]
    padded, packed = figures["train"]["padded"], figures["train"]["packed"]
    for side in (padded, packed):
        assert side["tokens_per_s"] > 0 and side["flops_per_s"] == 6 * side["params"] * side["tokens_per_s"]
    assert packed["pad_fraction"] < padded["pad_fraction"]
    assert abs(packed["first_loss"] - padded["first_loss"]) < 1e-2  # the same examples in each update
    assert figures["sampling"]["rows"] == 4 and figures["sampling"]["generated_tokens"] > 0
    assert figures["sampling"]["device"] == "cpu" and figures["sampling"]["dtype"] == "torch.bfloat16"


def test_gpu_check_without_cuda_fails_in_one_line():
    out = subprocess.run([sys.executable, "jobs/gpu_check.py"], cwd=ROOT, env=no_cuda_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.startswith("gpu_check: CUDA is not available") and out.stderr.count("\n") == 1
