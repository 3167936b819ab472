"""Benchmark: the machine's peak memory above idle for a real model's shape, and where the peak is.

    python jobs/bench_model_memory.py --shape qwen2.5-0.5b [--engine vllm] [--json out.json]
    python jobs/bench_model_memory.py --shape qwen2.5-1.5b --lora-r 16

Builds the model from its published config with random weights, saved in bf16 as the real
checkpoint is (offline; built once under $ITERFT_CACHE or ~/.cache/iterft_ray), with a tokenizer
of the real vocabulary size (iterft_ray.tiny's byte-level one, its vocabulary filled up to
151,936 ids). Then runs the tiny config's loop with it as a user would: one trainer rank, one
generator (`--engine`, vllm by default), 8 prompts x 2 samples a round, 2 rounds, a checkpoint
every round, no evaluation; every sample is accepted (length_bounds), so each round trains,
publishes a version and checkpoints.

A thread reads /proc/meminfo every 0.1 s: the peak is idle MemAvailable (read before Ray starts)
minus the lowest MemAvailable seen, i.e. what the run took from the machine (object store and
page cache of written checkpoints included, as a user's `free` shows). It names the phase the
peak fell in (start: Ray, actors, models loaded; then per round generate, step, sync,
checkpoint) and the resident memory of the run's largest processes at that moment.
MemAvailable is the whole machine's: other work on it moves the figure, so the processes
running besides this one are listed at the start (`--others`). It moved by up to 1.9 GB between runs
of the same code here (a process that had just ended still handing pages back, page cache counted as
available or not), so the bench also reports the held pages' peak: the growth of the pages processes
and the kernel hold (AnonPages, Shmem, Slab, PageTables, KernelStack), which page cache does not move.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from bench_common import environment, init_ray, print_environment, write_json
from iterft_ray.config import resolve_config

GB = 1e9
# Published configs (config.json on the hub), the fields that set the size.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960),
    # The benchmark's own smoke test: the real vocabulary on a 2-layer model (head_dim 64: vLLM on CPU needs it).
    "tiny-qwen2": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128),
}
QWEN2 = dict(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
             rms_norm_eps=1e-6, hidden_act="silu")


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes (MemAvailable; Shmem: the object store's pages, among others)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/meminfo")


def mem_available() -> int:
    return meminfo("MemAvailable")


# Where MemAvailable goes: processes' private pages, shared memory (the object store), the kernel's own.
MEMINFO_PARTS = ("AnonPages", "Shmem", "Dirty", "Writeback", "Slab", "PageTables", "KernelStack")
# The pages processes and the kernel hold (not page cache): a second measure of the peak, which the page cache's
# share of MemAvailable (other work's files, the run's checkpoints) does not move.
HELD = ("AnonPages", "Shmem", "Slab", "PageTables", "KernelStack")


def meminfo_parts() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        rows = dict(line.split(":", 1) for line in f)
    return {k: int(rows[k].split()[0]) * 1024 for k in MEMINFO_PARTS}


class PeakSampler:
    """Samples MemAvailable every `interval` s on a thread; remembers the lowest, its phase and the top processes."""

    def __init__(self, interval: float = 0.1):
        self.idle, self.idle_parts = mem_available(), meminfo_parts()
        self.parts_at_peak = self.idle_parts
        self.held_peak, self.phase_at_held_peak = 0, "start"
        self.lowest, self.phase, self.phase_at_peak, self.procs_at_peak = self.idle, "start", "start", []
        self.phase_peaks: dict[str, int] = {}
        # At each phase's peak: shared memory (GB) and the largest processes' private and shared RSS (GB).
        self.phase_detail: dict[str, tuple[float, list[tuple[str, float, float]]]] = {}
        self._stop = threading.Event()
        self._root = psutil.Process()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            avail, phase, parts = mem_available(), self.phase, meminfo_parts()
            used = self.idle - avail
            held = sum(parts[k] - self.idle_parts[k] for k in HELD)
            if held > self.held_peak:
                self.held_peak, self.phase_at_held_peak = held, phase
            if used > self.phase_peaks.get(phase, -1):
                self.phase_peaks[phase] = used
                self.phase_detail[phase] = (meminfo("Shmem") / GB, self._split_rss(self._top_processes()[:3]))
            if avail < self.lowest:
                self.lowest, self.phase_at_peak, self.parts_at_peak = avail, phase, parts
                self.procs_at_peak = self._top_processes()

    def _top_processes(self) -> list[tuple[str, float]]:
        procs = [self._root, *self._root.children(recursive=True)]
        rows = []
        for p in procs:
            try:
                rows.append((f"{p.pid} {' '.join(p.cmdline()[:2])[-60:]}", p.memory_info().rss / GB))
            except psutil.Error:
                continue
        return sorted(rows, key=lambda r: -r[1])[:6]

    @staticmethod
    def _split_rss(rows: list[tuple[str, float]]) -> list[tuple[str, float, float]]:
        """Each process's RSS as private (RssAnon) and shared-memory (RssShmem) pages: the object store's
        pages count in the RSS of every process that maps them, once in the machine's use."""
        split = []
        for name, _ in rows:
            try:
                with open(f"/proc/{name.split()[0]}/status") as f:
                    kb = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssShmem")))
            except OSError:
                continue
            split.append((name, int(kb["RssAnon"].split()[0]) * 1024 / GB, int(kb["RssShmem"].split()[0]) * 1024 / GB))
        return split

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return self.idle - self.lowest


def build_model(shape: str) -> str:
    """The shape's directory: random weights saved in bf16, the tokenizer with 151,936 ids (built once)."""
    import torch
    from tokenizers import models
    from transformers import AutoConfig, AutoModelForCausalLM

    from iterft_ray.tiny import build_tokenizer

    root = Path(os.environ.get("ITERFT_CACHE", Path.home() / ".cache" / "iterft_ray"))
    out = root / f"bench-{shape}-random-bf16"
    if (out / "config.json").exists():
        return str(out)
    tokenizer = build_tokenizer()
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab()
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), QWEN2["vocab_size"])})
    backend.model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    assert len(tokenizer) == QWEN2["vocab_size"], len(tokenizer)
    config = AutoConfig.for_model("qwen2", **SHAPES[shape], **QWEN2, dtype="bfloat16",
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    print(f"built {shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    tmp.rename(out)
    return str(out)


def run_config(model_dir: str, engine: str, lora_r: int | None, out_dir: str, kv_cache_bytes: int,
               max_model_len: int, trainer: dict) -> dict:
    with open(resolve_config("tiny"), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    cfg["model"] = {"name_or_path": model_dir, **({"lora": {"r": lora_r}} if lora_r else {})}
    cfg["data"]["task_options"] = {"num_train": 64, "num_heldout": 0, "num_warmup": 0}
    cfg["filters"] = [{"name": "length_bounds"}]
    cfg["sampling"] = {**cfg["sampling"], "engine": engine, "num_samples": 2, "max_new_tokens": 8,
                       "vllm": {"kv_cache_memory_bytes": kv_cache_bytes, "max_model_len": max_model_len}}
    cfg["trainer"] = {"learning_rate": 1e-5, "per_device_train_batch_size": 16, **trainer}
    cfg["resources"] = {"num_generators": 1, "filter_pool_size": 1}
    cfg["loop"] = {"rounds": 2, "prompts_per_round": 8, "warmup_passes": 0, "save_every": 1, "async_mode": False,
                   "output_dir": out_dir}
    return cfg


def others() -> list[str]:
    """Processes outside this run using over 200 MB: what else moves MemAvailable while it runs."""
    mine = {psutil.Process().pid}
    rows = []
    for p in psutil.process_iter(["pid", "memory_info", "cmdline"]):
        try:
            rss = p.info["memory_info"].rss
        except (psutil.Error, AttributeError):
            continue
        if p.pid not in mine and rss > 200e6:
            rows.append(f"{rss / GB:5.2f} GB  {' '.join(p.info['cmdline'] or [])[:100]}")
    return sorted(rows, reverse=True)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--lora-r", type=int, default=None, help="train a LoRA adapter of this rank (model.lora.r)")
    p.add_argument("--kv-cache-bytes", type=int, default=64 << 20,
                   help="sampling.vllm.kv_cache_memory_bytes (the engine's default on CPU: 1 GiB); 64 MiB holds one "
                        "sequence of --max-model-len at either shape (0.5B: 12 KiB a token, 1.5B: 28 KiB)")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="sampling.vllm.max_model_len: the run's sequences are ~40 tokens (unset, vLLM takes the "
                        "shapes' 32,768 positions and needs 384 MiB of KV cache at 0.5B to hold one)")
    p.add_argument("--trainer", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer.* setting on top of the run's (YAML value), e.g. gradient_checkpointing=true")
    p.add_argument("--json")
    args = p.parse_args()

    trainer = {}
    for item in args.trainer:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--trainer: expected KEY=VALUE, got {item!r}")
        trainer[key] = yaml.safe_load(value)
    model_dir = build_model(args.shape)
    env = environment()
    print_environment(env)
    besides = others()
    print("besides this run (RSS > 200 MB):\n  " + "\n  ".join(besides or ["nothing"]), flush=True)
    import ray

    from iterft_ray.run.loop import IterativeLoop

    sampler = PeakSampler()
    start = time.perf_counter()
    env.update(init_ray(num_cpus=4, log_to_driver=False))
    out_dir = tempfile.mkdtemp(prefix="bench_mem_")  # checkpoints: GBs, removed at the end
    loop = IterativeLoop(run_config(model_dir, args.engine, args.lora_r, out_dir, args.kv_cache_bytes,
                                    args.max_model_len, trainer))
    rl = loop.rl
    asked = {role: (q.count, q.bundle.get("memory", 0)) for role, q in rl._requests.items() if q.count}
    phased(rl, "step", sampler)
    phased(rl, "sync_weights", sampler)
    phased(loop, "save_checkpoint", sampler)
    rounds = []
    for r in range(loop.config.loop.rounds):
        sampler.phase = f"round {r + 1} generate+filter"
        stats = loop.round()
        rounds.append({"round": r + 1, "loss": stats.get("loss"), "accepted": stats.get("accepted")})
    sampler.phase = "end"
    wall = time.perf_counter() - start
    time.sleep(0.3)
    sampler.stop()
    loop.shutdown()
    ray.shutdown()
    shutil.rmtree(out_dir, ignore_errors=True)

    what = (f"{args.shape}{f' LoRA r{args.lora_r}' if args.lora_r else ' full fine-tune'}, {args.engine} engine"
            + "".join(f", {k}={v}" for k, v in trainer.items()))
    print(f"\n{what}: machine peak {sampler.peak / GB:.1f} GB above idle, in phase '{sampler.phase_at_peak}' "
          f"({wall:.0f} s)")
    print(f"held pages peak (growth of {' + '.join(HELD)}): {sampler.held_peak / GB:.1f} GB, in phase "
          f"'{sampler.phase_at_held_peak}'")
    print("peak per phase (GB above idle; at it, shared memory and the 3 largest processes' private + shared "
          "RSS, GB):")
    for phase, used in sampler.phase_peaks.items():
        shmem, procs = sampler.phase_detail[phase]
        largest = ", ".join(f"{name.split()[1].removeprefix('ray::')} {anon:.1f}+{shm:.1f}"
                            for name, anon, shm in procs)
        print(f"  {phase:34s} {used / GB:6.1f}   shm {shmem:4.1f}  {largest}")
    estimate = sum(n * b for n, b in asked.values())
    print("memory each actor asked Ray for (iterft_ray/actors/footprint.py's estimate, GB): "
          + ", ".join(f"{n} {role} x {b / GB:.2f}" for role, (n, b) in asked.items())
          + f"; {estimate / GB:.1f} GB in all, {estimate / sampler.peak:.2f}x the machine peak")
    grown = {k: (sampler.parts_at_peak[k] - sampler.idle_parts[k]) / GB for k in MEMINFO_PARTS}
    print("machine-wide growth from idle to the peak (/proc/meminfo, GB): "
          + ", ".join(f"{k} {v:+.2f}" for k, v in grown.items()))
    print("largest processes of the run at the peak (RSS, GB; shared memory counts in each):")
    for name, rss in sampler.procs_at_peak:
        print(f"  {rss:6.2f}  {name}")
    write_json(args.json, {"benchmark": "model_memory", "shape": args.shape, "engine": args.engine,
                           "lora_r": args.lora_r, "trainer": trainer, "environment": env, "besides": besides,
                           "peak_gb": sampler.peak / GB, "phase_at_peak": sampler.phase_at_peak,
                           "phase_peaks_gb": {k: v / GB for k, v in sampler.phase_peaks.items()},
                           "phase_detail": sampler.phase_detail, "meminfo_growth_gb": grown,
                           "held_peak_gb": sampler.held_peak / GB, "phase_at_held_peak": sampler.phase_at_held_peak,
                           "procs_at_peak": sampler.procs_at_peak, "wall_s": wall, "rounds": rounds,
                           "asked_memory_gb": {role: b / GB for role, (_, b) in asked.items()},
                           "estimate_over_peak": estimate / sampler.peak})


def phased(obj, method: str, sampler: PeakSampler) -> None:
    """Wrap `obj.method` so the sampler's phase names it while it runs (then back to the phase before)."""
    inner = getattr(obj, method)

    def wrapper(*args, **kwargs):
        before = sampler.phase
        sampler.phase = f"{before.split(' generate')[0]} {method}"
        try:
            return inner(*args, **kwargs)
        finally:
            sampler.phase = before

    setattr(obj, method, wrapper)


if __name__ == "__main__":
    main()
