"""The algorithm family: hand-computed values, identities between members, invariances for all."""

import math

import pytest
import torch

from rlpost import Batch, get_algorithm
from rlpost.algorithms import available
from rlpost.algorithms.base import aggregate, kl_estimate
from rlpost.algorithms.dapo import overlong_penalty
from rlpost.algorithms.ppo import gae
from rlpost.controller import advantage_metrics

ALL = sorted(available())


def batch_of(rewards, mask, groups=None, **fields):
    mask = torch.tensor(mask)
    B, T = mask.shape
    return Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                 response_mask=mask, rewards=torch.tensor(rewards, dtype=torch.float),
                 group_ids=torch.tensor(groups if groups is not None else [0] * B), **fields)


def random_batch(P=3, G=4, T=8, prompt=2, seed=0):
    """Left-padded-prompt layout: `prompt` columns of prompt, then responses of random length."""
    g = torch.Generator().manual_seed(seed)
    B = P * G
    lengths = torch.randint(1, T - prompt + 1, (B,), generator=g)
    cols = torch.arange(T)[None, :]
    mask = ((cols >= prompt) & (cols < prompt + lengths[:, None])).long()
    logp = -torch.rand(B, T, generator=g) * 2
    return Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                 response_mask=mask, old_logp=(logp + 0.2 * torch.randn(B, T, generator=g)) * mask,
                 ref_logp=(logp + 0.2 * torch.randn(B, T, generator=g)) * mask,
                 values=torch.randn(B, T, generator=g) * mask,
                 rewards=torch.randint(0, 2, (B,), generator=g).float(),
                 group_ids=torch.arange(P).repeat_interleave(G)), logp


def with_trainer_fields(batch):
    """What the trainer attaches on each micro-batch: entropy and current critic values."""
    g = torch.Generator().manual_seed(7)
    return batch.replace(entropy=torch.rand(batch.input_ids.shape, generator=g),
                         new_values=(batch.values + 0.1 * torch.randn(batch.input_ids.shape, generator=g))
                         * batch.response_mask)


# ---------------------------------------------------------------------------- shared pieces

def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # log(pi / pi_ref) = 1
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, ref, "k4")


def test_loss_aggregations_hand_computed():
    b = batch_of([0.0, 0.0], [[1, 1, 1], [1, 0, 0]])
    per_token = torch.tensor([[1.0, 2, 3], [4, 9, 9]])  # 9s are masked
    assert aggregate(per_token, b, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(per_token, b, "seq-mean-token-mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate(per_token, b, "seq-mean-token-sum-norm", 5).item() == pytest.approx(10 / (2 * 5))
    assert aggregate(per_token, b, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))


def test_kl_in_reward_shapes_the_sequence_reward():
    b = batch_of([1.0, 0.0], [[1, 1], [1, 1]], old_logp=torch.tensor([[-1.0, -1.0], [-1.0, -2.0]]),
                 ref_logp=torch.tensor([[-1.5, -1.0], [-1.0, -1.0]]))
    algo = get_algorithm("grpo", beta=0.1, kl_in="reward", kl_estimator="k1", eps=0.0)
    # k1 sums: row 0: 0.5 + 0 = 0.5, row 1: 0 - 1 = -1 -> shaped rewards 0.95 and 0.1
    r = torch.tensor([0.95, 0.1])
    expected = (r - r.mean()) / r.std()
    assert torch.allclose(algo.compute_advantages(b).advantages[:, 0], expected, atol=1e-6)


# ---------------------------------------------------------------------------- estimators

def test_reinforce_baselines_hand_computed():
    b = batch_of([1.0, 0, 0, 1], [[1]] * 4)
    assert get_algorithm("reinforce", baseline="none").compute_advantages(b).advantages[:, 0].tolist() == [1, 0, 0, 1]
    assert get_algorithm("reinforce").compute_advantages(b).advantages[:, 0].tolist() == [0.5, -0.5, -0.5, 0.5]
    ema = get_algorithm("reinforce", baseline="moving_average", ema=0.9)
    assert ema.compute_advantages(b).advantages[:, 0].tolist() == [0.5, -0.5, -0.5, 0.5]  # starts at its mean
    ones = b.replace(rewards=torch.ones(4))
    assert ema.compute_advantages(ones).advantages[0, 0].item() == pytest.approx(0.5)      # b = 0.5 (before update)
    assert ema.compute_advantages(ones).advantages[0, 0].item() == pytest.approx(1 - 0.55)  # b = 0.9*0.5 + 0.1*1


def test_rloo_leave_one_out_hand_computed():
    b = batch_of([1.0, 0, 0, 1, 3, 1], [[1]] * 6, groups=[0, 0, 0, 0, 1, 1])
    adv = get_algorithm("rloo").compute_advantages(b).advantages[:, 0]
    expected = [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 3 - 1, 1 - 3]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_rloo_equals_grpo_without_std_times_k_over_k_minus_1(seed):
    b, _ = random_batch(G=5, seed=seed)
    b = b.replace(rewards=torch.randn(len(b), generator=torch.Generator().manual_seed(seed)))
    rloo = get_algorithm("rloo").compute_advantages(b).advantages
    dr = get_algorithm("dr_grpo").compute_advantages(b).advantages  # GRPO without the std divisor
    assert torch.allclose(rloo, dr * 5 / 4, atol=1e-6)


def test_reinforce_pp_returns_and_global_whitening_hand_computed():
    mask = [[0, 1, 1], [0, 1, 0]]
    b = batch_of([1.0, 0.0], mask, old_logp=torch.tensor([[0.0, -1.0, -1.0], [0.0, -1.0, 0.0]]),
                 ref_logp=torch.tensor([[0.0, -1.5, -0.8], [0.0, -1.3, 0.0]]))
    adv = get_algorithm("reinforce_pp", beta=0.1, eps=0.0).compute_advantages(b).advantages
    # k1 per token: row 0: 0.5, -0.2; row 1: 0.3 -> rewards -0.05, 1 + 0.02; -0.03 -> returns 0.97, 1.02; -0.03
    g = torch.tensor([0.97, 1.02, -0.03])
    expected = (g - g.mean()) / g.std(unbiased=False)
    assert torch.allclose(adv[torch.tensor(mask).bool()], expected, atol=1e-5)
    assert adv[0, 0] == 0 and adv[1, 2] == 0


def test_gae_hand_computed():
    # prompt column, 3 response tokens, one pad column; gamma 0.9, lambda 0.8
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 0, 0, 1, 0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a2 = 1 - 0.7
    a1 = (0.9 * 0.7 - 0.6) + 0.72 * a2
    a0 = (0.9 * 0.6 - 0.5) + 0.72 * a1
    assert torch.allclose(adv, torch.tensor([[0, a0, a1, a2, 0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0, a0 + 0.5, a1 + 0.6, a2 + 0.7, 0]]), atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_gae_with_gamma_lambda_one_is_monte_carlo_return_minus_value(seed):
    b, _ = random_batch(seed=seed)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(b.input_ids.shape, generator=g) * b.response_mask
    adv, _ = gae(r, b.values, b.response_mask, gamma=1.0, lam=1.0)
    mc = r.flip(1).cumsum(1).flip(1)  # sum of rewards from t to the end of the response
    assert torch.allclose(adv, (mc - b.values) * b.response_mask, atol=1e-5)


def test_gspo_sequence_ratio_and_clip_hand_computed():
    b = batch_of([0.0, 0.0], [[1, 1, 1], [1, 1, 0]], old_logp=torch.zeros(2, 3),
                 advantages=torch.tensor([[1.0, 1, 1], [-1.0, -1, 0]]))
    logp = torch.tensor([[0.2, -0.1, 0.5], [0.0, 0.0, 7.0]])  # row 0: mean log-ratio 0.2; row 1: 0 (7 is masked)
    loss, m = get_algorithm("gspo").compute_loss(logp, b)
    # row 0: s = e^0.2 = 1.2214 > 1 + 4e-4 -> min(1.2214, 1.0004) * 1; row 1: s = 1 -> 1 * -1
    assert loss.item() == pytest.approx((-(1 + 4e-4) + 1.0) / 2, abs=1e-6)
    assert m["loss/clip_frac_high"] == 0.5


def test_dapo_overlong_penalty_hand_computed():
    lengths = torch.tensor([5, 6, 7, 10, 12])
    assert overlong_penalty(lengths, max_len=10, buffer=4).tolist() == [0.0, 0.0, -0.25, -1.0, -1.0]


def test_dapo_drops_degenerate_groups():
    b = batch_of([1.0, 1, 0, 1, 0, 0], [[1]] * 6, groups=[0, 0, 1, 1, 2, 2])
    out = get_algorithm("dapo").compute_advantages(b)
    assert out.group_ids.tolist() == [1, 1] and torch.isfinite(out.advantages).all()
    assert len(get_algorithm("dapo", dynamic_sampling=False).compute_advantages(b)) == 6


def test_ppo_value_loss_clipping_hand_computed():
    b = batch_of([0.0], [[1]], old_logp=torch.zeros(1, 1), values=torch.tensor([[0.5]]),
                 advantages=torch.zeros(1, 1), returns=torch.tensor([[0.9]]), new_values=torch.tensor([[1.0]]))
    loss, m = get_algorithm("ppo", beta=0.0, vf_coef=1.0, vf_clip=0.2).compute_loss(torch.zeros(1, 1), b)
    # clipped value 0.7: 0.5 * max((1.0 - 0.9)^2, (0.7 - 0.9)^2) = 0.02; the policy term is 0 (A = 0)
    assert loss.item() == pytest.approx(0.02) and m["value/loss"] == pytest.approx(0.02)
    assert m["value/clip_frac"] == 1.0


def test_ppo_explained_variance_is_one_for_a_perfect_critic():
    b, _ = random_batch()
    algo = get_algorithm("ppo", beta=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)
    b = b.replace(values=torch.zeros(b.input_ids.shape))
    b = algo.compute_advantages(b)
    b = b.replace(values=b.returns)  # a critic that predicted the returns exactly
    assert advantage_metrics(b)["value/explained_variance"] == pytest.approx(1.0)
    assert advantage_metrics(b.replace(values=torch.zeros_like(b.returns)))["value/explained_variance"] == \
        pytest.approx(0.0)


def test_ppo_explained_variance_is_the_batch_s_whatever_the_micro_batches():
    """A metric of the step's batch, not averaged over the trainer's micro-batches (a ratio of variances: its mean
    over micro-batches changes with micro_batch_size, which a resume may change)."""
    b, _ = random_batch()
    algo = get_algorithm("ppo", beta=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)
    b = algo.compute_advantages(b.replace(values=torch.zeros(b.input_ids.shape)))
    b = b.replace(values=b.returns + torch.randn(b.returns.shape))
    _, m = algo.compute_loss(b.old_logp, b.replace(new_values=b.values))
    assert "value/explained_variance" not in m  # the trainer averages compute_loss's metrics over micro-batches
    mask = b.response_mask.bool()
    ret, v = b.returns[mask].double(), b.values[mask].double()
    assert advantage_metrics(b)["value/explained_variance"] == pytest.approx(
        float(1 - (ret - v).var(unbiased=False) / ret.var(unbiased=False)), rel=1e-5)


# ---------------------------------------------------------------------------- identities

def test_dr_grpo_is_grpo_with_both_divisors_removed():
    b, logp = random_batch(G=4)
    algo = get_algorithm("dr_grpo")
    loss, _ = algo.compute_loss(logp, algo.compute_advantages(b))
    # by hand: A = r - group mean; GRPO's per-token clipped surrogate; sum / (sequences * response width)
    r = b.rewards.view(-1, 4)
    adv = (r - r.mean(1, keepdim=True)).reshape(-1, 1)
    ratio = torch.exp((logp - b.old_logp) * b.response_mask)
    surr = torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    expected = -(surr * b.response_mask).sum() / (len(b) * (b.input_ids.shape[1] - 2))
    assert abs(loss.item() - expected.item()) < 1e-6


@pytest.mark.parametrize("name", ["grpo", "ppo", "dapo", "reinforce_pp"])
def test_clipped_surrogate_gradient_at_ratio_one_equals_reinforce(name):
    b, _ = random_batch()
    b = b.replace(advantages=torch.randn(b.input_ids.shape) * b.response_mask)
    logp_a = b.old_logp.clone().requires_grad_(True)  # ratio exactly 1
    algo = get_algorithm(name, beta=0.0)
    per_token, _ = algo.policy_loss(logp_a, b)
    aggregate(per_token, b, "token-mean").backward()
    logp_b = b.old_logp.clone().requires_grad_(True)
    get_algorithm("reinforce").compute_loss(logp_b, b)[0].backward()
    assert torch.allclose(logp_a.grad, logp_b.grad, atol=1e-7)


# ---------------------------------------------------------------------------- invariances, for every algorithm

@pytest.mark.parametrize("name", ALL)
def test_every_algorithm_has_the_one_signature(name):
    b, logp = random_batch()
    algo = get_algorithm(name)
    out = algo.compute_advantages(b)
    assert isinstance(out, Batch) and out.advantages.shape == out.input_ids.shape
    # dapo drops rows
    loss, metrics = algo.compute_loss(logp[:len(out)].requires_grad_(True), with_trainer_fields(out))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in metrics.values())
    loss.backward()


@pytest.mark.parametrize("name", ALL)
def test_masked_positions_never_change_advantages_or_loss(name):
    b, logp = random_batch()
    algo = get_algorithm(name, beta=0.05)
    off = ~b.response_mask.bool()

    def garbage(t, value):
        return torch.where(off, torch.full_like(t, value), t)

    a1 = algo.compute_advantages(b)
    a2 = get_algorithm(name, beta=0.05).compute_advantages(
        b.replace(old_logp=garbage(b.old_logp, -1e4), ref_logp=garbage(b.ref_logp, 30.0),
                  values=garbage(b.values, 1e3)))
    assert torch.allclose(a1.advantages, a2.advantages, atol=1e-6)
    lp, m1 = logp[:len(a1)], ~a1.response_mask.bool()
    full = with_trainer_fields(a1)
    loss1, _ = algo.compute_loss(lp, full)
    dirty = full.replace(old_logp=torch.where(m1, -1e4, full.old_logp), ref_logp=torch.where(m1, 30.0, full.ref_logp),
                         new_values=torch.where(m1, 1e3, full.new_values), entropy=torch.where(m1, 1e3, full.entropy))
    loss2, _ = algo.compute_loss(torch.where(m1, 80.0, lp), dirty)
    assert torch.isfinite(loss2) and abs(loss1.item() - loss2.item()) < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_micro_batch_losses_sum_to_the_full_batch_loss_and_gradient(name):
    b, logp = random_batch(P=4)
    algo = get_algorithm(name, beta=0.05, entropy_coef=0.01)
    b = with_trainer_fields(algo.compute_advantages(b))
    lp = logp[:len(b)]  # dapo may have dropped rows; any log-probs of the right shape will do
    full = lp.clone().requires_grad_(True)
    algo.compute_loss(full, b)[0].backward()
    acc_grad, acc_loss = torch.zeros_like(lp), 0.0
    for start, mb in zip(range(0, len(b), 5), b.micro_batches(5)):
        part = lp[start:start + 5].clone().requires_grad_(True)
        loss, _ = algo.compute_loss(part, mb)
        loss.backward()
        acc_loss += loss.item()
        acc_grad[start:start + 5] = part.grad
    assert abs(acc_loss - algo.compute_loss(lp, b)[0].item()) < 1e-6
    assert torch.allclose(full.grad, acc_grad, atol=1e-7)


def test_entropy_bonus_lowers_the_loss_by_coef_times_mean_entropy():
    b, logp = random_batch()
    b = get_algorithm("grpo", beta=0.0).compute_advantages(b)
    b = b.replace(entropy=torch.full(b.input_ids.shape, 2.0))
    plain, _ = get_algorithm("grpo", beta=0.0).compute_loss(logp, b)
    bonus, _ = get_algorithm("grpo", beta=0.0, entropy_coef=0.1).compute_loss(logp, b)
    assert bonus.item() == pytest.approx(plain.item() - 0.1 * 2.0, abs=1e-6)


def test_advantage_clipping():
    b = batch_of([10.0, 0.0], [[1], [1]], groups=[0, 1])
    adv = get_algorithm("reinforce", adv_clip=2.0).compute_advantages(b).advantages
    assert adv[:, 0].tolist() == [2.0, -2.0]


def test_bad_shared_option_is_named():
    with pytest.raises(ValueError, match="loss_agg='mean'; valid: token-mean"):
        get_algorithm("grpo", loss_agg="mean")
    with pytest.raises(ValueError, match="kl_in='logits'"):
        get_algorithm("ppo", kl_in="logits")
