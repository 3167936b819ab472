"""Ray job entrypoint: one iterative fine-tuning run.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/iterative_sft.py --config demo   # a built-in name or jobs/configs/*.yaml

Under `ray job submit` RAY_ADDRESS is set, so the run joins the cluster; run directly,
it starts a local Ray.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from iterft_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML path or built-in config name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in loop.output_dir and start afresh")
    args = parser.parse_args()
    flags = [f for f, on in (("--resume", args.resume), ("--overwrite", args.overwrite)) if on]
    sys.exit(main(["run", args.config, *[f"--set={s}" for s in args.set], *flags]))
