"""Numerical edge cases of the algorithm family, each against hand-computed values: rewards that are equal
but not representable in binary, micro-batches without a response token, non-finite rewards."""

import math

import pytest
import torch

from rlpost import Batch, get_algorithm
from rlpost.algorithms import available

ALL = sorted(available())
GROUP_NORMALISED = {"grpo": {}, "gspo": {}, "dapo": {"dynamic_sampling": False}, "dr_grpo": {}, "rloo": {},
                    "cispo": {},
                    "sapo": {}}


def one_token_batch(rewards, groups, **fields):
    """One prompt column and one response token per row."""
    B = len(rewards)
    return Batch(input_ids=torch.zeros(B, 2, dtype=torch.long), attention_mask=torch.ones(B, 2, dtype=torch.long),
                 response_mask=torch.tensor([[0, 1]] * B), rewards=torch.tensor(rewards, dtype=torch.float),
                 group_ids=torch.tensor(groups), **fields)


# ---------------------------------------------------------------------------- groups of equal rewards

@pytest.mark.parametrize("name", sorted(GROUP_NORMALISED))
@pytest.mark.parametrize("value", [0.98, 0.1, 0.7, 1 / 3, -2.2, 1e6 + 0.1])
@pytest.mark.parametrize("k", [16, 3, 7])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(name, value, k):
    # 16 float32 copies of 0.98 do not average to exactly 0.98: without care the ~1e-8 residue is divided
    # by a ~1e-8 std and becomes |A| ~ 0.2, a signal made of rounding.
    b = one_token_batch([value] * k, [0] * k)
    adv = get_algorithm(name, **GROUP_NORMALISED[name]).compute_advantages(b).advantages
    assert len(adv) == k and (adv == 0).all(), adv[:, 1].tolist()


@pytest.mark.parametrize("name", ["grpo", "gspo", "dapo"])
def test_group_standardisation_hand_computed_next_to_a_constant_group(name):
    # group 0: [1, 0, 0, 1] -> mean 1/2, unbiased std sqrt(1/3) -> A = +-sqrt(3)/2
    # group 1: 15 x 0.98 and one 0.99 -> deviations -0.01/16 and 0.15/16, unbiased std 0.01/4 -> A = -1/4, 15/4
    # group 2: 16 x 0.98 -> 0
    rewards = [1.0, 0, 0, 1] + [0.98] * 15 + [0.99] + [0.98] * 16
    groups = [0] * 4 + [1] * 16 + [2] * 16
    params = {**GROUP_NORMALISED[name], "eps": 0.0}
    adv = get_algorithm(name, **params).compute_advantages(one_token_batch(rewards, groups)).advantages[:, 1]
    h = math.sqrt(3) / 2
    expected = [h, -h, -h, h] + [-0.25] * 15 + [3.75] + [0.0] * 16
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-5), adv.tolist()
    assert (adv[20:] == 0).all()


def test_dapo_drops_exactly_the_groups_grpo_zeroes():
    rewards = [0.98] * 16 + [0.98] * 15 + [0.99]
    b = one_token_batch(rewards, [0] * 16 + [1] * 16)
    assert get_algorithm("dapo").compute_advantages(b).group_ids.tolist() == [1] * 16


# ---------------------------------------------------------------------------- micro-batches without a response

def empty_tail_batch():
    """Two prompt columns, two response columns; rows 2 and 3 have empty responses. Group 0 has rewards
    [1, 0] -> Dr.GRPO advantages +-1/2; group 1 is constant -> 0. old_logp = logp (ratio 1)."""
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    logp = torch.tensor([[0.0, 0, -0.5, -1.0], [0, 0, -0.7, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    b = Batch(input_ids=torch.zeros(4, 4, dtype=torch.long), attention_mask=torch.ones(4, 4, dtype=torch.long),
              response_mask=mask, old_logp=logp, rewards=torch.tensor([1.0, 0, 0, 0]),
              group_ids=torch.tensor([0, 0, 1, 1]))
    return b, logp


def test_dr_grpo_loss_and_gradient_through_micro_batches_with_only_empty_responses():
    b, logp = empty_tail_batch()
    algo = get_algorithm("dr_grpo")
    b = algo.compute_advantages(b)
    # per token -A; sum over tokens / (4 sequences * response width 2) = -(1/2 * 2 - 1/2 * 1) / 8
    expected_grad = torch.tensor([[0.0, 0, -1 / 16, -1 / 16], [0, 0, 1 / 16, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    losses, grad = [], torch.zeros(4, 4)
    for start, mb in zip((0, 2), b.micro_batches(2)):
        part = logp[start:start + 2].clone().requires_grad_(True)
        loss, _ = algo.compute_loss(part, mb)
        loss.backward()
        losses.append(loss.item())
        grad[start:start + 2] = part.grad
    assert losses[0] == pytest.approx(-1 / 16) and losses[1] == 0.0  # the empty micro-batch contributes 0
    assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.1])
def test_dr_grpo_on_a_batch_of_only_empty_responses_gives_zero_loss_and_gradient(entropy_coef):
    b, logp = empty_tail_batch()
    b = b.select([2, 3]).replace(entropy=torch.ones(2, 4))
    algo = get_algorithm("dr_grpo", entropy_coef=entropy_coef)
    part = logp[2:].clone().requires_grad_(True)
    loss, _ = algo.compute_loss(part, algo.compute_advantages(b))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(part.grad, torch.zeros(2, 4))


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("name", ALL)
def test_every_algorithm_gives_zero_on_a_micro_batch_of_empty_responses(name, loss_agg):
    b, logp = empty_tail_batch()
    zeros = torch.zeros(4, 4)
    b = b.replace(rewards=torch.tensor([1.0, 0, 1, 0]), ref_logp=zeros, values=zeros, entropy=zeros, new_values=zeros)
    algo = get_algorithm(name, loss_agg=loss_agg, beta=0.05, entropy_coef=0.01)
    _, empty = algo.compute_advantages(b).micro_batches(2)
    part = logp[2:].clone().requires_grad_(True)
    loss, _ = algo.compute_loss(part, empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(part.grad, torch.zeros(2, 4))


# ---------------------------------------------------------------------------- non-finite rewards

def four_rows(rewards, **fields):
    mask = torch.tensor([[0, 1, 1]] * 4)
    return Batch(input_ids=torch.zeros(4, 3, dtype=torch.long), attention_mask=torch.ones(4, 3, dtype=torch.long),
                 response_mask=mask, old_logp=torch.zeros(4, 3), ref_logp=torch.zeros(4, 3), values=torch.zeros(4, 3),
                 rewards=rewards, group_ids=torch.tensor([0, 0, 1, 1]), **fields)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ALL)
def test_a_non_finite_reward_is_named_by_row_and_prompt(name, bad):
    rows = [{"prompt": f"p{i}", "answer": "4"} for i in range(4)]
    b = four_rows(torch.tensor([1.0, 0, bad, 0]), meta={"row": rows})
    with pytest.raises(ValueError, match=rf"{name}: reward {bad} of row 2 \(prompt 'p2'\) is not finite"):
        get_algorithm(name).compute_advantages(b)
    with pytest.raises(ValueError, match=rf"{name}: reward {bad} of row 2 is not finite"):  # no meta: the index
        get_algorithm(name).compute_advantages(b.replace(meta={}))


@pytest.mark.parametrize("name", ALL)
def test_token_rewards_are_checked_on_response_tokens_only(name):
    r = torch.zeros(4, 3)
    r[0, 2], r[1, 1] = 1.0, 0.5
    r[3, 0] = math.nan  # a prompt column: never read
    assert torch.isfinite(get_algorithm(name).compute_advantages(four_rows(r)).advantages).all()
    r[3, 2] = math.inf
    with pytest.raises(ValueError, match="reward inf of row 3 is not finite"):
        get_algorithm(name).compute_advantages(four_rows(r))


@pytest.mark.parametrize("name", ALL)
def test_missing_rewards_are_named(name):
    with pytest.raises(ValueError, match=rf"{name}.compute_advantages needs batch.rewards"):
        get_algorithm(name).compute_advantages(four_rows(None))
