"""The scheduler's own work per decode step (rlpost/rollout/scheduler.py), outside the model's forward: a small
model's decode step is bound by the count of small torch ops, so the bookkeeping around the forward (sampling,
finished rows, positions, masks) is held to a budget of ops, counted at the dispatcher."""

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from rlpost.config import ModelConfig
from rlpost.models import load_model
from rlpost.rollout import SamplingParams
from rlpost.rollout.hf_native import HFNativeEngine


class OpsOutsideModel(TorchDispatchMode):
    """Counts the torch ops run outside the runner's forward / logits; `gaps`: those between one decode step's
    forward and the next one's."""

    def __init__(self, engine):
        super().__init__()
        self.ops, self.at_step, self.inside = 0, [], False
        for name in ("forward", "logits"):
            setattr(engine, name, self._model_call(getattr(engine, name), name == "forward"))

    def _model_call(self, fn, count_step):
        def call(*args):
            if count_step and args[1].shape[1] == 1:  # ids [L, 1]: a decode step (a prefill feeds the prompts)
                self.at_step.append(self.ops)
            self.inside = True
            try:
                return fn(*args)
            finally:
                self.inside = False
        return call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not self.inside
        return func(*args, **(kwargs or {}))

    @property
    def gaps(self) -> list[int]:
        return [b - a for a, b in zip(self.at_step, self.at_step[1:])]


@pytest.mark.parametrize("min_new_tokens", [0, 12], ids=["free", "min-tokens"])
def test_a_lockstep_decode_step_costs_few_ops_outside_the_model(tiny_llama_dir, min_new_tokens):
    model, tok = load_model(ModelConfig(name=tiny_llama_dir))
    engine = HFNativeEngine(model.eval(), tok)
    prompts = [tok.encode_prompt(p) for p in ("12+34=", "5+6=", "The answer is")]  # left-padded rows
    params = SamplingParams(max_new_tokens=12, min_new_tokens=min_new_tokens, temperature=1.0)
    with OpsOutsideModel(engine) as count:
        batch = engine.generate(prompts, 4, params, seed=0)
    assert len(count.gaps) >= 6 and batch.response_mask.sum() > 12 * len(count.gaps) / 2
    # the rows run in lockstep (nobody joins late): what depends only on which sequences run (positions,
    # the left-padding mask, the lockstep test) is built when that changes, not at every step. A draw and its
    # bookkeeping (sampling, old_logp, the token tables, finished rows) and the step's inputs take 39 ops, 44
    # with min_new_tokens; building all of it at every step took 79 / 86
    assert sorted(count.gaps)[len(count.gaps) // 2] < 50, count.gaps
