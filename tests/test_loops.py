"""Topologies are loops (rlpost/loops/): a registry picks one by rl.topology, each checks its own settings at
config load, and the controller runs the same seven steps over whichever it is given. No Ray here: the
async loop is driven over an in-process engine (tests/test_topologies.py runs the Ray ones)."""

import ast
import inspect

import pytest
import torch

from rlpost import controller, get_algorithm
from rlpost.config import ConfigError, RLConfig, RolloutConfig, TrainerConfig, load_config
from rlpost.controller import Controller, Roles
from rlpost.loops import LOOPS, TOPOLOGIES, WEIGHT_SYNCS, check_config, loop_class
from rlpost.loops.async_ import AsyncLoop
from rlpost.loops.colocated import ColocatedLoop
from rlpost.env.reward import Reward
from rlpost.rollout import SamplingParams
from rlpost.rollout.native import NativeEngine
from rlpost.rollout.pipeline import RolloutPipeline
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync

ROWS = [{"prompt": f"{a}+{b}=", "answer": "0"} for a in range(10, 20) for b in range(2)]


def parity(completion, row):
    return float(len(completion) % 2)


def roles_for(model, tok, target):
    """The roles of a reference-free GRPO step; the weight sync pushes to `target` (the engine or a pipeline)."""
    engine = target.engine if isinstance(target, RolloutPipeline) else target
    return Roles(engine=engine, reward=Reward(parity, tok), algorithm=get_algorithm("grpo", beta=0.0),
                 trainer=Trainer(model, TrainerConfig(lr=1e-3)), weight_sync=WeightSync(model, target))


def test_every_topology_is_a_registered_loop():
    assert list(LOOPS.classes) == list(TOPOLOGIES) == ["colocated", "disaggregated", "async"]
    # the transports to Ray workers, and the colocated aliases that name how the engine holds the weights
    assert WEIGHT_SYNCS == ("auto", "pointer", "copy", "vllm", "ray", "collective")
    assert all(loop_class(name).name == name and loop_class(name).description for name in LOOPS.classes)
    with pytest.raises(ValueError, match="'rl.topology' is 'ray'; valid values: colocated, disaggregated, async"):
        loop_class("ray")


def test_the_controller_names_no_topology():
    """The seven steps are one code path: which topology runs is the loop's business (its code, docstrings and
    comments aside, names no topology and no pipeline)."""
    tree = ast.parse(inspect.getsource(controller))
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    for word in ("colocated", "disaggregated", "async", "pipeline", "max_staleness", "submitted"):
        assert not [w for w in words if word in w.lower()], word


@pytest.mark.parametrize("overrides, message", [
    (["rl.weight_sync=collective"], "rl.weight_sync=collective moves weights to Ray rollout workers"),
    (["rl.weight_sync=vllm"], "rollout.engine=vllm and rl.weight_sync=vllm go together"),
    (["rl.topology=disaggregated", "rl.weight_sync=copy"], "rl.topology=disaggregated sends weights .* not 'copy'"),
    (["rl.weight_sync=nccl"], "'rl.weight_sync' is 'nccl'; valid values: auto, pointer, copy, vllm, ray, collective"),
    (["trainer.strategy=fsdp2", "rl.weight_sync=pointer"], "trainer.strategy=fsdp2 needs rl.weight_sync=copy"),
    (["trainer.strategy=fsdp2", "rl.topology=disaggregated"], "disaggregated with sharded training is not supported"),
])
def test_each_loop_refuses_what_it_cannot_run_at_config_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_aliases_and_the_transports_load():
    for overrides in (["rl.weight_sync=pointer"], ["rl.weight_sync=copy"], ["trainer.strategy=fsdp2"],
                      ["rollout.engine=vllm", "rl.weight_sync=vllm"], ["rl.topology=async", "rl.weight_sync=ray"],
                      ["rl.topology=disaggregated", "rl.weight_sync=collective"]):
        cfg = load_config(None, overrides)
        check_config(cfg, has_rl=True)


def test_the_run_engine_holds_the_weights_the_way_the_settings_say(tiny_gpt):
    model, tok = tiny_gpt
    for overrides, mode in ((["rl.weight_sync=auto"], "pointer"), (["rl.weight_sync=copy"], "copy"),
                            (["rl.topology=async"], "pointer")):  # async: evaluation samples on the module
        cfg = load_config(None, [*overrides, "rollout.dtype=fp32"])
        engine = loop_class(cfg.rl.topology).run_engine(cfg, model, tok)
        assert WeightSync(model, engine).mode == mode, overrides


class CountingLoop(ColocatedLoop):
    """A new topology in one class: the colocated loop, counting the rounds it collected."""

    description = "colocated, counted"

    def __init__(self, cfg, rollout):
        super().__init__(cfg, rollout)
        self.rounds = 0

    def collect(self, ctl, step, n_prompts, round_):
        self.rounds += 1
        return super().collect(ctl, step, n_prompts, round_)

    def state_dict(self):
        return {"counted": self.rounds}


def test_a_new_topology_is_one_class_and_its_registry_line(tiny_gpt):
    model, tok = tiny_gpt
    LOOPS.register("counted")(CountingLoop)
    try:
        cfg = load_config(None, ["rl.topology=counted", "rollout.dtype=fp32"])  # a valid name once registered
        engine = loop_class("counted").run_engine(cfg, model, tok)
        ctl = Controller(roles_for(model, tok, engine), RLConfig(topology="counted"),
                         SamplingParams(max_new_tokens=4), RolloutConfig(prompts_per_step=2, k=2, max_refill_rounds=0),
                         rows=ROWS, prompt_ids=[tok.encode_prompt(r["prompt"]) for r in ROWS])
        ctl.step(1)
        ctl.step(2)
        assert isinstance(ctl.loop, CountingLoop) and ctl.state_dict()["counted"] == 2
    finally:
        del LOOPS.classes["counted"]


def async_controller(model, tok, staleness, steps):
    """The async loop over an in-process engine: its pipeline placed by hand instead of over Ray workers."""
    cfg = RLConfig(topology="async", max_staleness=staleness, steps=steps)
    rollout = RolloutConfig(prompts_per_step=2, k=2, max_refill_rounds=0)
    params = SamplingParams(max_new_tokens=4)
    loop = AsyncLoop(cfg, rollout)
    loop.pipeline = RolloutPipeline(NativeEngine(model, tok, share_weights=False), Reward(parity, tok), rollout.k,
                                    params)
    ctl = Controller(roles_for(model, tok, loop.pipeline), cfg, params, rollout, rows=ROWS,
                     prompt_ids=[tok.encode_prompt(r["prompt"]) for r in ROWS], loop=loop)
    return ctl, loop


def test_the_async_loop_runs_ahead_exactly_max_staleness_steps(tiny_gpt):
    model, tok = tiny_gpt
    ctl, loop = async_controller(model, tok, staleness=2, steps=5)
    try:
        seen = []
        for step in range(1, 6):
            m = ctl.step(step)
            seen.append(m["rollout/staleness_max"])
            assert m["rollout/staleness_mean"] == m["rollout/staleness_max"]
            assert loop.submitted == min(step + 2, 5)  # never past the last step
        assert seen == [0.0, 1.0, 2.0, 2.0, 2.0]
        # the seconds of rollout and reward ran in the pipeline's thread: this thread counts its wait instead
        assert m["time/step"] >= m["time/rollout_wait"]
    finally:
        loop.close()


def test_the_async_loops_rollouts_made_ahead_are_in_the_controllers_state(tiny_gpt):
    model, tok = tiny_gpt
    ctl, loop = async_controller(model, tok, staleness=1, steps=4)
    try:
        ctl.step(1)
        state = ctl.state_dict()
        assert set(state) == {"sampler", "algorithm", "ahead"}
        assert state["ahead"]["submitted"] == 2 and list(state["ahead"]["results"]) == [2]
        batch, _ = state["ahead"]["results"][2]
        assert torch.equal(batch.policy_version, torch.zeros(len(batch), dtype=batch.policy_version.dtype))
    finally:
        loop.close()


def test_an_unplaced_async_loop_says_so(tiny_gpt):
    model, tok = tiny_gpt
    engine = NativeEngine(model, tok)
    ctl = Controller(roles_for(model, tok, engine), RLConfig(topology="async", steps=2), SamplingParams(),
                     RolloutConfig(prompts_per_step=2, k=2), rows=ROWS,
                     prompt_ids=[tok.encode_prompt(r["prompt"]) for r in ROWS])
    with pytest.raises(RuntimeError, match="rl.topology=async: the rollout is not placed yet"):
        ctl.step(1)
