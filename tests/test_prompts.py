"""Which prompts a step draws: the mixture of task.sources by weight (every step, not on average), the set-aside
pool of rl.recycle_every (prompts all right or all wrong skipped until they are recycled), and both samplers'
state, which a resumed run continues from."""

import copy
import random
from types import SimpleNamespace

import pytest
import torch

from rlpost import get_algorithm
from rlpost.config import ConfigError, RLConfig, RolloutConfig, TrainerConfig, load_config
from rlpost.controller import Controller, Roles
from rlpost.prompts import MixtureSampler, PromptSampler, Recycler
from rlpost.env.reward import Reward
from rlpost.rollout import SamplingParams
from rlpost.rollout.native import NativeEngine
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync


def test_the_plain_sampler_draws_what_it_always_drew():
    """The default walk is the seeded shuffle, epoch after epoch: moving it left the default run's prompts alone."""
    rng, expected = random.Random(7), []
    for _ in range(3):
        order = list(range(10))
        rng.shuffle(order)
        expected += order[::-1]
    s = PromptSampler(10, 7)
    assert s.next(4) + s.next(26) == expected


def test_a_mixture_holds_its_weights_in_every_step_and_walks_each_source_whole():
    s = MixtureSampler([(0, 5), (5, 100)], [1.0, 3.0], seed=3)  # a small source (rows 0-4), a large one (5-104)
    seen_small = []
    for _ in range(10):
        idx = s.next(8)
        small = [i for i in idx if i < 5]
        assert len(small) == 2 and len(idx) - len(small) == 6  # 1:3 of 8 prompts, each step
        seen_small += small
    for epoch in range(4):  # 20 draws of 5 rows: each epoch every row once, in a new order
        assert sorted(seen_small[5 * epoch:5 * epoch + 5]) == [0, 1, 2, 3, 4]
    # uneven weights: within one prompt of the share, over any stretch of draws
    s = MixtureSampler([(0, 50), (50, 50), (100, 50)], [0.5, 0.2, 0.3], seed=0)
    draws = s.next(1000)
    for n in (7, 100, 1000):
        counts = [sum(lo <= i < lo + 50 for i in draws[:n]) for lo in (0, 50, 100)]
        assert all(abs(c - w * n) <= 1 for c, w in zip(counts, (0.5, 0.2, 0.3))), (n, counts)


def test_a_mixture_resumed_from_its_state_draws_the_same_prompts():
    s = MixtureSampler([(0, 7), (7, 11)], [2.0, 1.0], seed=5)
    s.next(13)
    state = copy.deepcopy(s.state_dict())
    ahead = s.next(40)
    t = MixtureSampler([(0, 7), (7, 11)], [2.0, 1.0], seed=5)
    t.load_state_dict(state)
    assert t.next(40) == ahead
    with pytest.raises(ValueError, match="not a mixture of 3 sources"):
        MixtureSampler([(0, 1), (1, 1), (2, 1)], [1, 1, 1], seed=0).load_state_dict(state)


def test_weights_at_the_float_limits_keep_their_shares():
    # 1e308 twice: their sum, paid back each draw, overflowed to inf and the credits became nan
    s = MixtureSampler([(0, 4), (4, 4)], [1e308, 1e308], seed=0)
    draws = s.next(8)
    assert sum(i < 4 for i in draws) == 4 and all(c == c for c in s.credit)
    s = MixtureSampler([(0, 4), (4, 4)], [3e307, 1e308], seed=0)  # 3:10, as 3:10 in any units
    t = MixtureSampler([(0, 4), (4, 4)], [3.0, 10.0], seed=0)
    assert s.next(26) == t.next(26)
    # a finite sum, but a credit that builds up past the limit: the shares were 1995:5 of 2000, not 10:7
    s = MixtureSampler([(0, 4), (4, 4)], [1e308, 7e307], seed=0)
    assert s.next(1700) == MixtureSampler([(0, 4), (4, 4)], [10.0, 7.0], seed=0).next(1700)
    s = MixtureSampler([(0, 4), (4, 4)], [1.0, 1e-300], seed=0)  # next to nothing: the second never comes
    assert all(i < 4 for i in s.next(50))


def scored(rows, picked, rewards_per_group):
    """A scored batch as the recycler reads it: each picked row's group of samples, with the rewards given."""
    meta_rows, rewards, groups = [], [], []
    for g, (i, rs) in enumerate(zip(picked, rewards_per_group)):
        meta_rows += [rows[i]] * len(rs)
        rewards += rs
        groups += [g] * len(rs)
    return SimpleNamespace(rewards=torch.tensor(rewards), group_ids=torch.tensor(groups), meta={"row": meta_rows})


def test_prompts_all_right_or_all_wrong_are_set_aside_until_recycled():
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(6)]
    r = Recycler(PromptSampler(6, 0), rows, every=3)
    r.start_step(1)
    first = r.next(3)
    rates = r.observe(scored(rows, first, [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))
    assert rates == [1.0, 0.0, 0.5]
    assert r.set_aside == {first[0], first[1]}
    m = r.metrics(rates)
    assert m["data/set_aside"] == 2 and m["data/recycled"] == 0
    assert m["data/pq_mean"] == pytest.approx(0.25 / 3)
    assert [m[f"data/pq_hist_{b}"] for b in range(5)] == [pytest.approx(2 / 3), 0, 0, 0, pytest.approx(1 / 3)]
    r.start_step(2)
    drawn = r.next(12)  # three epochs of what is left: the set-aside two never come
    assert not set(drawn) & {first[0], first[1]} and len(drawn) == 12
    r.start_step(3)  # every 3 steps they return
    assert r.recycled == 2 and r.set_aside == set()
    assert {first[0], first[1]} <= set(r.next(12))
    # identical rows are one prompt; a prompt scored again at 0.5 stays in the pool
    twins = [{"prompt": "same", "answer": "1"}, {"prompt": "same", "answer": "1"}, {"prompt": "other", "answer": "2"}]
    r = Recycler(PromptSampler(3, 0), twins, every=5)
    r.observe(scored(twins, [0], [[0.0, 0.0, 0.0]]))
    assert r.set_aside == {0, 1}
    # every prompt set aside: they all return rather than the draw waiting forever
    r.observe(scored(twins, [2], [[1.0]]))
    assert r.next(2) and r.set_aside == set() and r.recycled == 3


def test_a_recycler_resumed_from_its_state_draws_the_same_prompts():
    rows = [{"prompt": f"q{i}"} for i in range(20)]
    r = Recycler(MixtureSampler([(0, 8), (8, 12)], [1.0, 1.0], seed=2), rows, every=4)
    picked = r.next(6)
    r.observe(scored(rows, picked, [[1.0]] * 3 + [[0.0, 1.0]] * 3))
    state = copy.deepcopy(r.state_dict())
    ahead = r.next(30)
    t = Recycler(MixtureSampler([(0, 8), (8, 12)], [1.0, 1.0], seed=2), rows, every=4)
    t.load_state_dict(state)
    assert t.set_aside == set(picked[:3]) and t.next(30) == ahead


def test_a_pool_the_weights_never_reach_returns_rather_than_the_draw_hanging():
    # source 0's rows all set aside, source 1 weighs 1e-300: the draws only ever reach source 0's set-aside rows,
    # but not every prompt is set aside, so the draw used to loop forever
    rows = [{"prompt": f"q{i}"} for i in range(6)]
    r = Recycler(MixtureSampler([(0, 2), (2, 4)], [1.0, 1e-300], seed=0), rows, every=100)
    r.observe(scored(rows, [0, 1], [[1.0, 1.0], [0.0, 0.0]]))
    assert r.set_aside == {0, 1}
    assert sorted(r.next(4)) == [0, 0, 1, 1] and r.recycled == 2 and r.set_aside == set()


def easy_or_coin(completion, row):
    """Prompts starting with 1 are always solved (a group with no signal); the others depend on the sample."""
    return 1.0 if row["prompt"].startswith("1") else float(len(completion) % 2)


def controller(tiny_gpt, rl: RLConfig, rows):
    model, tok = tiny_gpt
    engine = NativeEngine(model, tok)
    roles = Roles(engine=engine, reward=Reward(easy_or_coin, tok), algorithm=get_algorithm("grpo", beta=0.0),
                  trainer=Trainer(model, TrainerConfig(lr=1e-3)), weight_sync=WeightSync(model, engine))
    return Controller(roles, rl, SamplingParams(max_new_tokens=5), RolloutConfig(prompts_per_step=4, k=4),
                      rows=rows, prompt_ids=[tok.encode_prompt(r["prompt"]) for r in rows], seed=0)


def test_the_controller_skips_set_aside_prompts_and_logs_the_pool(tiny_gpt):
    rows = [{"prompt": f"{a}+{b}=", "answer": "0"} for a in (1, 2) for b in range(6)]  # 6 easy, 6 coin flips
    ctl = controller(tiny_gpt, RLConfig(recycle_every=3), rows)
    aside = set()
    for step in range(1, 5):
        metrics = ctl.step(step)
        drawn = {r["prompt"] for r in ctl.sampled.meta["row"]}
        if step % 3:  # between recycles, a prompt set aside is not drawn again
            assert not drawn & aside, step
        else:
            assert metrics["data/recycled"] == len(aside) > 0
        aside = {rows[i]["prompt"] for i in ctl.recycler.set_aside}
        easy_drawn = {p for p in drawn if p.startswith("1")}
        assert easy_drawn <= aside  # every easy prompt seen was set aside
        assert metrics["data/set_aside"] == len(ctl.recycler.set_aside)
        assert sum(metrics[f"data/pq_hist_{b}"] for b in range(5)) == pytest.approx(1.0)
    # off (the default): no pool, no data/ metrics
    ctl = controller(tiny_gpt, RLConfig(), rows)
    assert ctl.recycler is None and not any(k.startswith("data/") for k in ctl.step(1))


def test_recycling_is_refused_where_ranks_would_set_aside_different_prompts():
    with pytest.raises(ConfigError, match="rl.recycle_every with trainer.strategy=fsdp2"):
        load_config(None, ["rl.recycle_every=2", "trainer.strategy=fsdp2"])


def test_a_recycle_period_shorter_than_an_epoch_is_warned_about(tiny_gpt):
    """A prompt comes round once an epoch: recycled sooner, a set-aside prompt is back before its next draw."""
    rows = [{"prompt": f"{a}+{b}=", "answer": "0"} for a in (1, 2) for b in range(6)]  # 12 prompts, 4 a step: 3
    with pytest.warns(UserWarning, match=r"rl.recycle_every=2 is shorter than an epoch \(12 prompts at 4 a step: 3"):
        controller(tiny_gpt, RLConfig(recycle_every=2), rows)


def test_a_recycler_resumed_while_its_pool_is_out_of_reach_draws_the_same_prompts():
    """Hostile weights (1 : 1e-300) and the reachable source wholly set aside: the original and a copy resumed
    from its state return the pool at the same draw and draw the same prompts after it."""
    rows = [{"prompt": f"q{i}"} for i in range(7)]

    def make():
        return Recycler(MixtureSampler([(0, 3), (3, 4)], [1.0, 1e-300], seed=4), rows, every=50)

    r = make()
    r.next(2)
    r.observe(scored(rows, [0, 1, 2], [[1.0], [0.0], [1.0, 1.0]]))
    state = copy.deepcopy(r.state_dict())
    ahead = r.next(9)
    t = make()
    t.load_state_dict(state)
    assert t.set_aside == {0, 1, 2} and t.next(9) == ahead and t.recycled == r.recycled > 0


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf"), True, "2"])
def test_the_mixture_sampler_refuses_a_weight_that_is_not_positive_and_finite(weight):
    """Config load refuses these; the sampler (what a Controller given `mixture=` builds) did not, and a source of
    weight 0, -1 or NaN was silently never drawn."""
    with pytest.raises(ValueError, match=r"positive finite numbers: source 1 \(rows 5\.\.7\) has weight"):
        MixtureSampler([(0, 5), (5, 3)], [1.0, weight], seed=0)
    drawn = MixtureSampler([(0, 5), (5, 3)], [3, 1], seed=0).next(8)  # 3:1 of 8: six of the first, two of the second
    assert sum(i < 5 for i in drawn) == 6 and all(0 <= i < 8 for i in drawn)
