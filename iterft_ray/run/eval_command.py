"""`iterft eval`: a run's evaluation, without training, on one of its checkpoints, or on a config's base model.

The weights reach the generators the way they do in a run (a trainer restored from the checkpoint
publishes them), the prompts are sharded over the same number of generators and sampled under the
same seeds as the run's evaluation after that checkpoint's round, so the greedy accuracy of a
checkpoint equals the `eval_greedy` the run recorded for it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iterft_ray.actors.failures import Deadline, wait_for
from iterft_ray.config import RunConfig, load_config
from iterft_ray.data.chat import load_chat_tokenizer, with_chat_template
from iterft_ray.ray_trainer import RayIterativeSFTTrainer
from iterft_ray.run.evaluation import Evaluation, evaluation_filters, load_eval_prompts
from iterft_ray.run.run_dir import latest_checkpoint
from iterft_ray.data.prompts import load_prompts
from iterft_ray.storage import StoragePath
from iterft_ray.train.checkpoint import META, is_checkpoint


@dataclass
class EvalTarget:
    """What `iterft eval` evaluates, decided before Ray starts: a config, the checkpoint (None: the base
    model), the round whose evaluation seeds it reuses, and where the rows and metrics go."""

    config: RunConfig
    checkpoint: StoragePath | None
    round_index: int
    folder: StoragePath  # NAME.parquet (the rows) and NAME.json (the metrics) go here
    name: str

    @property
    def rows(self) -> StoragePath:
        return self.folder / f"{self.name}.parquet"


def eval_target(run_or_config: str, checkpoint: str | None = None, output: str | None = None,
                config_data: dict[str, Any] | None = None) -> EvalTarget:
    """Resolve `iterft eval RUN_DIR [--checkpoint DIR] [--output DIR]`; a config (`config_data`, read by the CLI
    from a YAML path or built-in name) evaluates its base model. Errors name the argument."""
    run = StoragePath.of(run_or_config)
    if config_data is None:
        if not (run / "config.yaml").is_file():
            raise ValueError(f"RUN_DIR: {run_or_config} holds no run (no config.yaml); expected a run's "
                             "loop.output_dir, or a config to evaluate its base model")
        config = load_config(_read_yaml(run / "config.yaml"))
        chosen = StoragePath.of(checkpoint) if checkpoint is not None else latest_checkpoint(run)
    else:
        config, chosen = load_config(config_data), StoragePath.of(checkpoint) if checkpoint is not None else None
        run = StoragePath.of(output or config.loop.output_dir)
    if chosen is not None and not is_checkpoint(chosen):
        raise ValueError(f"--checkpoint: {chosen} is not a complete checkpoint (no training state)")
    round_index = 0
    if chosen is not None:
        round_index = json.loads((chosen / META).read_text()).get("extra", {}).get("round_index", 0)
    name = chosen.name if chosen is not None else "base"
    folder = StoragePath.of(output) if output is not None else run / "eval"
    return EvalTarget(config, chosen, round_index, folder, name)


def evaluate(target: EvalTarget) -> dict[str, Any]:
    """Run the evaluation of `target` on the Ray at hand (started by the caller); returns its metrics."""
    c = target.config
    train, _, task = load_prompts(c.data)
    prompts = load_eval_prompts(c, task, train)
    if prompts is None:
        raise ValueError("eval: this config has no evaluation prompts; give eval.prompts_file or eval.dataset")
    if c.data.chat_template:
        prompts = with_chat_template(prompts, load_chat_tokenizer(c.model), c.data.system_prompt)
    with tempfile.TemporaryDirectory(prefix="iterft-eval-") as scratch:
        rl = RayIterativeSFTTrainer(
            c.model, {"output_dir": scratch, "report_to": "none", "seed": c.loop.seed, **c.trainer},
            resources=c.resources, sampling=c.sampling, filters=c.filters, filter_timeout_s=c.loop.filter_timeout_s,
            checkpoint=target.checkpoint, env=c.env, system_prompt=c.data.system_prompt,
        )
        try:
            evaluation = Evaluation(prompts, evaluation_filters(c), c.eval.num_samples, c.loop.seed)
            ref = evaluation.start(rl, target.rows, target.round_index)
            deadline = Deadline.after(c.loop.round_timeout_s, "loop.round_timeout_s")
            metrics = wait_for([ref], deadline, "evaluate", rl.actor_roster(), fetch=True)[0]
        finally:
            rl.shutdown()
    result = {"checkpoint": str(target.checkpoint) if target.checkpoint else "base", **metrics,
              "heldout_accuracy": metrics["eval_greedy"]}
    (target.folder / f"{target.name}.json").write_text(json.dumps(result) + "\n")
    return result


def _read_yaml(path: StoragePath) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def is_run_dir(location: str) -> bool:
    """A run's output directory (it has the config.yaml a run writes), as opposed to a config."""
    return Path(location).suffix not in (".yaml", ".yml") and (StoragePath.of(location) / "config.yaml").is_file()
