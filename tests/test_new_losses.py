"""CISPO and SAPO: losses and gradients against hand computations from the papers' formulas, the limits the
formulas imply, the shared options on top of them, the registry, and a short training run with each."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rlpost import Batch, get_algorithm
from rlpost.algorithms import available
from rlpost.algorithms.base import aggregate
from rlpost.config import load_config
from rlpost.run import train

D = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def hand_batch(log_ratios, advantages, old=(-1.0, -2.0, -0.5, -1.5, -0.7)):
    """Two rows after one prompt column: row 0 has 3 response tokens, row 1 has 2 (then a pad column).
    The 5 response tokens get old log-probs `old`, current log-probs old + `log_ratios`, and advantages
    `advantages` (one per row). Off the response every field holds garbage that must never be read.
    Returns the batch, logp (leaf, with grad) and the 5 (row, column) positions."""
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    pos = [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    old_logp = torch.full((2, 4), 7.0, dtype=D)
    logp = torch.full((2, 4), 50.0, dtype=D)
    adv = torch.full((2, 4), 9.0, dtype=D)
    for k, (i, t) in enumerate(pos):
        old_logp[i, t] = old[k]
        logp[i, t] = old[k] + log_ratios[k]
        adv[i, t] = advantages[i]
    batch = Batch(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long),
                  response_mask=mask, old_logp=old_logp, advantages=adv * mask, rewards=torch.zeros(2),
                  group_ids=torch.zeros(2, dtype=torch.long))
    return batch, logp.requires_grad_(True), pos


def grads_at(logp, pos):
    return [logp.grad[i, t].item() for i, t in pos]


# ---------------------------------------------------------------------------- CISPO

# log-ratios chosen so that the tokens land above the upper clip (A > 0 and A < 0), inside it, and far below 1
CISPO_LOG_RATIOS = [0.5, 0.1, -3.0, 0.4, -0.5]
CISPO_ADV = [1.0, -0.5]


def cispo_by_hand(clip_low, clip_high, old=(-1.0, -2.0, -0.5, -1.5, -0.7)):
    """-(1/N) sum_t sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) * A_t * log pi_t and its gradient -w_t * A_t / N."""
    adv = [CISPO_ADV[0]] * 3 + [CISPO_ADV[1]] * 2
    loss, grad = 0.0, []
    for d, o, a in zip(CISPO_LOG_RATIOS, old, adv):
        w = min(max(math.exp(d), 1 - clip_low), 1 + clip_high)
        loss += -w * a * (o + d) / 5
        grad.append(-w * a / 5)
    return loss, grad


@pytest.mark.parametrize("clip_low,clip_high", [(1.0, 0.28), (0.2, 0.28), (1.0, 2.0)])
def test_cispo_loss_and_gradient_hand_computed(clip_low, clip_high):
    b, logp, pos = hand_batch(CISPO_LOG_RATIOS, CISPO_ADV)
    loss, metrics = get_algorithm("cispo", clip_low=clip_low, clip_high=clip_high).compute_loss(logp, b)
    loss.backward()
    want_loss, want_grad = cispo_by_hand(clip_low, clip_high)
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)
    assert grads_at(logp, pos) == pytest.approx(want_grad, abs=1e-12)
    assert logp.grad[0, 0] == 0 and logp.grad[1, 3] == 0  # prompt and pad positions
    rhos = [math.exp(d) for d in CISPO_LOG_RATIOS]
    assert metrics["loss/clip_frac_high"] == pytest.approx(sum(r > 1 + clip_high for r in rhos) / 5)
    assert metrics["loss/clip_frac_low"] == pytest.approx(sum(r < 1 - clip_low for r in rhos) / 5)


def test_cispo_defaults_are_the_papers_one_sided_clip():
    cfg = get_algorithm("cispo").cfg
    assert 1 - cfg.clip_low <= 0  # no lower bound: the paper's eps_low is "large"
    assert cfg.beta == 0.0 and cfg.loss_agg == "token-mean"  # no KL term; 1 / sum_i |o_i|
    assert not get_algorithm("cispo").uses_reference


def test_cispo_keeps_the_gradient_of_a_token_grpo_clips():
    """Token 0 has rho = e^0.5 = 1.65 > 1.28 with A = +1 and token 3 has rho = e^0.4 = 1.49 > 1.28 with
    A = -0.5: PPO's min() takes the unclipped branch for A < 0 but the clipped, constant branch for A > 0,
    so GRPO's gradient at token 0 is exactly 0; CISPO's is -1.28 * 1 / 5."""
    b, logp, pos = hand_batch(CISPO_LOG_RATIOS, CISPO_ADV)
    get_algorithm("grpo", beta=0.0, clip_low=0.2, clip_high=0.28).compute_loss(logp, b)[0].backward()
    grpo = grads_at(logp, pos)
    assert grpo[0] == 0.0
    assert grpo[3] == pytest.approx(-math.exp(0.4) * -0.5 / 5, abs=1e-12)  # unclipped branch: -rho * A / N
    logp.grad = None
    get_algorithm("cispo").compute_loss(logp, b)[0].backward()
    cispo = grads_at(logp, pos)
    assert cispo[0] == pytest.approx(-1.28 / 5, abs=1e-12)
    assert all(g != 0 for g in cispo)  # every response token keeps a gradient


# ---------------------------------------------------------------------------- SAPO

SAPO_LOG_RATIOS = [0.3, 0.0, -0.4, 0.25, -0.1]
SAPO_ADV = [0.8, -1.2]


def sapo_by_hand(tau_pos, tau_neg, log_ratios=SAPO_LOG_RATIOS, adv=SAPO_ADV):
    """The paper's objective, loss = -(1/G) sum_i (1/|y_i|) sum_t (4/tau) sigmoid(tau (rho - 1)) A_i, and its
    gradient in log pi: -(1/G)(1/|y_i|) * 4 p (1 - p) * rho * A_i, p = sigmoid(tau (rho - 1))."""
    lengths, G = [3, 3, 3, 2, 2], 2
    a = [adv[0]] * 3 + [adv[1]] * 2
    loss, grad = 0.0, []
    for d, n, ai in zip(log_ratios, lengths, a):
        tau = tau_pos if ai > 0 else tau_neg
        rho = math.exp(d)
        p = sigmoid(tau * (rho - 1))
        loss += -(4 / tau) * p * ai / (G * n)
        grad.append(-4 * p * (1 - p) * rho * ai / (G * n))
    return loss, grad


@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (0.5, 3.0), (4.0, 0.2)])
def test_sapo_loss_and_gradient_hand_computed(tau_pos, tau_neg):
    b, logp, pos = hand_batch(SAPO_LOG_RATIOS, SAPO_ADV)
    loss, metrics = get_algorithm("sapo", tau_pos=tau_pos, tau_neg=tau_neg).compute_loss(logp, b)
    loss.backward()
    want_loss, want_grad = sapo_by_hand(tau_pos, tau_neg)
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)
    assert grads_at(logp, pos) == pytest.approx(want_grad, abs=1e-12)
    assert logp.grad[0, 0] == 0 and logp.grad[1, 3] == 0
    taus = [tau_pos] * 3 + [tau_neg] * 2
    ps = [sigmoid(t * (math.exp(d) - 1)) for d, t in zip(SAPO_LOG_RATIOS, taus)]
    # metrics are float32 means
    assert metrics["loss/gate_weight_mean"] == pytest.approx(sum(4 * p * (1 - p) for p in ps) / 5, abs=1e-6)


def test_sapo_defaults_are_the_papers():
    cfg = get_algorithm("sapo").cfg
    assert (cfg.tau_pos, cfg.tau_neg) == (1.0, 1.05)
    assert cfg.beta == 0.0 and cfg.loss_agg == "seq-mean-token-mean"
    with pytest.raises(ValueError, match="tau_neg=0.0; it must be > 0"):
        get_algorithm("sapo", tau_neg=0.0)


def one_token_sapo_grad(log_ratio, adv, tau):
    """d loss / d log pi of a batch of one single-token response (G = |y| = 1)."""
    b, logp, _ = hand_batch([log_ratio] * 5, [adv, adv])
    b = b.replace(response_mask=torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]]))
    get_algorithm("sapo", tau_pos=tau, tau_neg=tau, loss_agg="token-mean").compute_loss(logp, b)[0].backward()
    return logp.grad[0, 1].item()


@pytest.mark.parametrize("tau", [0.1, 1.0, 1.05, 10.0])
def test_sapo_on_policy_gradient_is_reinforce_for_every_temperature(tau):
    # w(1) = 4 * sigmoid(0) * (1 - sigmoid(0)) = 1: d loss / d log pi = -A
    for adv in (0.7, -1.3):
        assert one_token_sapo_grad(0.0, adv, tau) == pytest.approx(-adv, abs=1e-12)


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_sapo_gate_is_smooth_with_no_zero_gradient_plateau(adv):
    """The gradient weight is sech^2(tau (rho - 1) / 2): positive at every ratio, falling monotonically as rho
    leaves 1 on either side. PPO's clipped surrogate (clip 0.2) has exactly zero gradient for A > 0 above
    rho = 1.2 and for A < 0 below rho = 0.8; SAPO's is never zero there."""
    tau = 1.0
    rhos = [0.3, 0.5, 0.8, 0.95, 1.0, 1.05, 1.2, 1.5, 2.0, 3.0]
    weights = []
    for rho in rhos:
        g = one_token_sapo_grad(math.log(rho), adv, tau)
        w = g / (-rho * adv)  # d loss / d log pi = -w(rho) * rho * A
        assert w == pytest.approx(1 / math.cosh(tau * (rho - 1) / 2) ** 2, abs=1e-12)
        assert w > 0
        weights.append(w)
    top = rhos.index(1.0)
    assert all(a < b for a, b in zip(weights[:top], weights[1:top + 1]))  # rising up to rho = 1
    assert all(a > b for a, b in zip(weights[top:], weights[top + 1:]))  # falling after it
    clipped_by_ppo = [r for r in rhos if (adv > 0 and r > 1.2) or (adv < 0 and r < 0.8)]
    for rho in clipped_by_ppo:
        b, logp, _ = hand_batch([math.log(rho)] * 5, [adv, adv])
        b = b.replace(response_mask=torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]]))
        get_algorithm("grpo", beta=0.0, clip_low=0.2, clip_high=0.2).compute_loss(logp, b)[0].backward()
        assert logp.grad[0, 1].item() == 0.0
        assert one_token_sapo_grad(math.log(rho), adv, tau) != 0.0


def test_sapo_temperature_limits():
    """tau -> 0: w -> 1 at every ratio, the gradient of the unclipped surrogate -rho * A.
    tau -> infinity: w -> 0 away from rho = 1 (the gate closes), while w(1) stays 1."""
    for rho in (0.5, 1.3, 2.5):
        small = one_token_sapo_grad(math.log(rho), 1.0, 1e-4)
        assert small == pytest.approx(-rho, rel=1e-6)
        assert abs(one_token_sapo_grad(math.log(rho), 1.0, 200.0)) < 1e-12
    # a larger temperature attenuates an off-policy token more
    grads = [abs(one_token_sapo_grad(math.log(1.3), 1.0, tau)) for tau in (0.5, 1.0, 2.0, 8.0)]
    assert all(a > b for a, b in zip(grads, grads[1:]))
    assert one_token_sapo_grad(0.0, 1.0, 200.0) == pytest.approx(-1.0, abs=1e-12)


def test_sapo_extreme_ratio_stays_finite():
    b, logp, _ = hand_batch([300.0, -300.0, 0.0, 300.0, -300.0], SAPO_ADV)
    loss, _ = get_algorithm("sapo").compute_loss(logp, b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


# ---------------------------------------------------------------------------- shared options on top of both

@pytest.mark.parametrize("name", ["cispo", "sapo"])
def test_advantage_is_grpos_group_standardisation_hand_computed(name):
    # group 0: [1, 0, 0, 1] -> mean 1/2, unbiased std sqrt(1/3) -> A = +-sqrt(3)/2; group 1: all equal -> 0
    b = Batch(input_ids=torch.zeros(7, 2, dtype=torch.long), attention_mask=torch.ones(7, 2, dtype=torch.long),
              response_mask=torch.tensor([[0, 1]] * 7), rewards=torch.tensor([1.0, 0, 0, 1, 0.98, 0.98, 0.98]),
              group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1]))
    adv = get_algorithm(name, eps=0.0).compute_advantages(b).advantages
    h = math.sqrt(3) / 2
    assert torch.allclose(adv[:, 1], torch.tensor([h, -h, -h, h, 0, 0, 0]), atol=1e-6)
    assert (adv[:, 0] == 0).all() and (adv[4:] == 0).all()


@pytest.mark.parametrize("name", ["cispo", "sapo"])
def test_on_policy_gradient_equals_reinforce(name):
    """At rho = 1 the CISPO weight is 1 and the SAPO gate weight is 1: both give the REINFORCE gradient."""
    b, _, _ = hand_batch([0.0] * 5, [0.9, -0.4])
    logp_a = b.old_logp.clone().requires_grad_(True)
    per_token, _ = get_algorithm(name).policy_loss(logp_a, b)
    aggregate(per_token, b, "token-mean").backward()
    logp_b = b.old_logp.clone().requires_grad_(True)
    get_algorithm("reinforce").compute_loss(logp_b, b)[0].backward()
    assert torch.allclose(logp_a.grad, logp_b.grad, atol=1e-12)


@pytest.mark.parametrize("name", ["cispo", "sapo"])
def test_rollout_correction_multiplies_the_per_token_loss(name):
    """tis at token level, cap 2: each token's policy loss times min(pi_old / mu, 2), by hand."""
    log_ratios = CISPO_LOG_RATIOS if name == "cispo" else SAPO_LOG_RATIOS
    b, logp, pos = hand_batch(log_ratios, CISPO_ADV if name == "cispo" else SAPO_ADV)
    raw_w = [3.0, 0.4, 1.0, 1.5, 0.3]  # pi_old / mu per response token
    rollout = b.old_logp.clone()
    for (i, t), w in zip(pos, raw_w):
        rollout[i, t] = b.old_logp[i, t] - math.log(w)
    b = b.replace(rollout_logp=rollout)
    algo = get_algorithm(name, rollout_correction="tis", rollout_correction_cap=2.0, loss_agg="token-mean")
    loss, metrics = algo.compute_loss(logp, b)
    loss.backward()
    if name == "cispo":
        _, grad = cispo_by_hand(1.0, 0.28)
        adv = [CISPO_ADV[0]] * 3 + [CISPO_ADV[1]] * 2
        old = (-1.0, -2.0, -0.5, -1.5, -0.7)
        terms = [-min(max(math.exp(d), 0.0), 1.28) * a * (o + d) / 5 for d, a, o in zip(log_ratios, adv, old)]
    else:
        adv = [SAPO_ADV[0]] * 3 + [SAPO_ADV[1]] * 2
        taus = [1.0 if a > 0 else 1.05 for a in adv]
        ps = [sigmoid(t * (math.exp(d) - 1)) for d, t in zip(log_ratios, taus)]
        terms = [-(4 / t) * p * a / 5 for p, t, a in zip(ps, taus, adv)]
        grad = [-4 * p * (1 - p) * math.exp(d) * a / 5 for p, d, a in zip(ps, log_ratios, adv)]
    caps = [min(w, 2.0) for w in raw_w]
    assert loss.item() == pytest.approx(sum(x * c for x, c in zip(terms, caps)), abs=1e-12)
    assert grads_at(logp, pos) == pytest.approx([g * c for g, c in zip(grad, caps)], abs=1e-12)
    assert metrics["correction/clipped_frac"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("name", ["cispo", "sapo"])
def test_kl_and_entropy_add_their_terms(name):
    b, logp, pos = hand_batch(SAPO_LOG_RATIOS, SAPO_ADV)
    ref = b.old_logp.clone()
    for (i, t), d in zip(pos, [0.2, -0.1, 0.0, 0.3, 0.1]):
        ref[i, t] = b.old_logp[i, t] - d
    b = b.replace(ref_logp=ref, entropy=torch.full((2, 4), 1.5, dtype=D))
    plain, _ = get_algorithm(name, loss_agg="token-mean").compute_loss(logp, b)
    both, metrics = get_algorithm(name, loss_agg="token-mean", beta=0.1, entropy_coef=0.01).compute_loss(logp, b)
    # k3(pi, pi_ref) per token with x = log pi - log pi_ref = log-ratio to old + d
    k3 = [math.exp(-x) + x - 1 for x in (s + d for s, d in zip(SAPO_LOG_RATIOS, [0.2, -0.1, 0.0, 0.3, 0.1]))]
    assert both.item() == pytest.approx(plain.item() + 0.1 * sum(k3) / 5 - 0.01 * 1.5, abs=1e-12)
    assert metrics["loss/kl_ref"] == pytest.approx(sum(k3) / 5, abs=1e-6)
    assert get_algorithm(name, beta=0.1).uses_reference


# ---------------------------------------------------------------------------- registry and training

def test_registry_lists_both():
    names = available()
    assert "cispo" in names and "sapo" in names
    out = subprocess.run([sys.executable, "-m", "rlpost.cli", "algorithms"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout
    for name in ("cispo", "sapo"):
        line = next(x for x in out.splitlines() if x.split() and x.split()[0] == name)
        assert available()[name] in line


@pytest.mark.parametrize("name,extra,metric", [
    ("cispo", ["trainer.minibatches=2"], "loss/is_weight_mean"),
    ("sapo", ["trainer.minibatches=2", "algorithm.rollout_correction=tis"], "loss/gate_weight_mean"),
])
def test_a_short_training_run_has_finite_metrics(name, extra, metric, tmp_path):
    """SFT then RL with each algorithm on a tiny model; two minibatches per batch so that the second one
    sees a ratio away from 1 (the clip / gate is exercised), sapo also with the rollout correction on."""
    cfg = load_config(None, [f"algorithm.name={name}", "sft.steps=2", "rl.steps=3", "rl.eval_every=0",
                             "task.num_eval=4", "rollout.prompts_per_step=2", "rollout.k=4", "model.n_layer=1",
                             "model.n_embd=32", "model.n_head=2", "threads=1", f"out_dir={tmp_path}",
                             f"run_name={name}", *extra])
    assert train(cfg)["status"] == "ok"
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in lines if m["stage"] == "rl"]
    assert len(rl) == 3
    for m in rl:
        assert metric in m
        numbers = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert all(math.isfinite(v) for v in numbers.values()), numbers
