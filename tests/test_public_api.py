"""What a user types: `from iterft_ray import ...` gives the trainers, the loop, the config and the errors a run
stops with, and importing the package alone starts nothing heavy."""

import subprocess
import sys

import iterft_ray


def test_every_exported_name_resolves_and_the_errors_are_exceptions():
    names = {name: getattr(iterft_ray, name) for name in iterft_ray.__all__}
    assert {"IterativeSFTTrainer", "IterativeSFTConfig", "IterativeLoop", "RayIterativeSFTTrainer", "RunConfig",
            "load_config"} <= set(names)
    errors = {"ActorFailedError", "RoundTimeoutError", "PlacementError", "FilterErrorsError", "PromptDataError"}
    assert errors <= set(names)
    assert all(issubclass(names[e], Exception) for e in errors)
    assert isinstance(iterft_ray.load_config({"model": {"name_or_path": "tiny-llama"}}), iterft_ray.RunConfig)


def test_importing_the_package_imports_neither_torch_nor_ray():
    code = "import sys, iterft_ray; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
