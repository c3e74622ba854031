"""The rollout importance-sampling correction (rlpost/algorithms/correction.py): hand-computed weights and
statistics, the corrected loss against its formula, Trainer.logprobs against the training forward, the
controller's wiring, and a statistical test on a bandit whose policy gradient is known in closed form."""

import json
import math

import pytest
import torch

from rlpost import Batch, get_algorithm
from rlpost.algorithms import available
from rlpost.algorithms.correction import HIST_EDGES, correction_metrics, correction_weights
from rlpost.config import RLConfig, RolloutConfig, TrainerConfig, load_config
from rlpost.controller import Controller, Roles
from rlpost.models import token_logprobs
from rlpost.env.reward import Reward
from rlpost.rollout import SamplingParams
from rlpost.rollout.native import NativeEngine
from rlpost.run import train
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync
from test_controller import SpyTrainer

D = torch.float64


def hist_keys():
    edges = (0.0, *HIST_EDGES, float("inf"))
    return [f"correction/weight_hist/{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]


def hand_batch():
    """Two rows, one prompt column; row 0 has 3 response tokens, row 1 has 2 (then a pad column).
    Raw per-token weights pi_prox / mu: row 0: 3, 0.4, 1; row 1: 1.5, 0.3. Off the response, garbage."""
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    rollout = torch.tensor([[-7.0, -1.0, -2.0, -0.5], [-7.0, -0.3, -1.2, -1e4]], dtype=D)
    w = torch.tensor([[1.0, 3.0, 0.4, 1.0], [1.0, 1.5, 0.3, 1.0]], dtype=D)
    old = torch.where(mask.bool(), rollout + w.log(), torch.full_like(rollout, 5.0))
    return Batch(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long),
                 response_mask=mask, old_logp=old, rollout_logp=rollout)


# mode, level -> (weights on the 5 response tokens, weight_mean, weight_max, clipped/masked fraction, histogram)
HAND = {
    ("tis", "token"): ([2.0, 0.4, 1.0, 1.5, 0.3], 5.2 / 5, 3.0, 1 / 5,
                       {"0.25-0.5": 2 / 5, "0.95-1.05": 1 / 5, "1.25-2": 1 / 5, "2-4": 1 / 5}),
    ("mis", "token"): ([0.0, 0.0, 1.0, 1.5, 0.0], 2.5 / 5, 3.0, 3 / 5,
                       {"0.25-0.5": 2 / 5, "0.95-1.05": 1 / 5, "1.25-2": 1 / 5, "2-4": 1 / 5}),
    # sequence weights: row 0: 3 * 0.4 * 1 = 1.2; row 1: 1.5 * 0.3 = 0.45 (below 1/cap = 0.5: masked)
    ("tis", "sequence"): ([1.2, 1.2, 1.2, 0.45, 0.45], 4.5 / 5, 1.2, 0.0, {"1.05-1.25": 3 / 5, "0.25-0.5": 2 / 5}),
    ("mis", "sequence"): ([1.2, 1.2, 1.2, 0.0, 0.0], 3.6 / 5, 1.2, 2 / 5, {"1.05-1.25": 3 / 5, "0.25-0.5": 2 / 5}),
}


@pytest.mark.parametrize("mode,level", list(HAND))
def test_weights_and_statistics_hand_computed(mode, level):
    b = hand_batch()
    weights, mean, wmax, frac, hist = HAND[(mode, level)]
    w = correction_weights(b, mode, 2.0, level)
    assert torch.allclose(w[b.response_mask.bool()], torch.tensor(weights, dtype=D), atol=1e-12)
    assert not w.requires_grad
    m = correction_metrics(b, mode, 2.0, level)
    assert m["correction/weight_mean"] == pytest.approx(mean, abs=1e-6)
    assert m["correction/weight_max"] == pytest.approx(wmax, abs=1e-6)
    assert m["correction/clipped_frac" if mode == "tis" else "correction/masked_frac"] == pytest.approx(frac)
    assert ("correction/masked_frac" in m) == (mode == "mis") and ("correction/clipped_frac" in m) == (mode == "tis")
    expected = {k: 0.0 for k in hist_keys()} | {f"correction/weight_hist/{k}": v for k, v in hist.items()}
    assert {k: v for k, v in m.items() if "weight_hist" in k} == pytest.approx(expected)
    assert sum(m[k] for k in hist_keys()) == pytest.approx(1.0)


def test_histogram_has_open_ends_and_an_overflowed_sequence_weight_lands_in_the_last_bin():
    b = hand_batch()
    b = b.replace(old_logp=b.old_logp + 400.0 * b.response_mask)  # exp(sum of log-ratios) overflows to inf
    m = correction_metrics(b, "tis", 2.0, "sequence")
    assert m["correction/weight_hist/8-inf"] == 1.0 and m["correction/clipped_frac"] == 1.0
    assert torch.equal(correction_weights(b, "tis", 2.0, "sequence")[b.response_mask.bool()],
                       torch.full((5,), 2.0, dtype=D))
    w = correction_weights(b, "mis", 2.0, "sequence")
    assert (w[b.response_mask.bool()] == 0).all() and (w[~b.response_mask.bool()] == 1).all()


def test_config_validation_names_the_valid_values():
    with pytest.raises(ValueError, match="none, tis, mis"):
        get_algorithm("grpo", rollout_correction="is")
    with pytest.raises(ValueError, match="token, sequence"):
        get_algorithm("grpo", rollout_correction_level="geometric")
    with pytest.raises(ValueError, match=">= 1"):
        get_algorithm("grpo", rollout_correction="mis", rollout_correction_cap=0.5)
    assert not get_algorithm("grpo").needs_proximal_logp
    assert get_algorithm("grpo", rollout_correction="tis").needs_proximal_logp


def test_the_loss_fails_clearly_without_rollout_logp():
    b = hand_batch().replace(rollout_logp=None, advantages=torch.ones(2, 4, dtype=D))
    with pytest.raises(ValueError, match="rollout_logp"):
        get_algorithm("grpo", beta=0.0, rollout_correction="tis").compute_loss(b.old_logp.clone(), b)


def test_corrected_grpo_loss_hand_computed():
    b = hand_batch()
    b = b.replace(advantages=torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, -0.5, -0.5, 0.0]], dtype=D))
    delta = [[0.1, -0.3, 0.0], [0.5, 0.0]]  # log pi_theta - log pi_prox on the response tokens
    logp = b.old_logp.clone()
    logp[0, 1:4] += torch.tensor(delta[0], dtype=D)
    logp[1, 1:3] += torch.tensor(delta[1], dtype=D)
    algo = get_algorithm("grpo", beta=0.0, clip_low=0.2, clip_high=0.28, loss_agg="token-mean",
                         rollout_correction="tis", rollout_correction_cap=2.0)
    loss, metrics = algo.compute_loss(logp, b)
    # by hand: -min(rho * A, clip(rho, 0.8, 1.28) * A) * min(w, 2), token mean over 5 tokens
    terms = []
    for d, a, w in zip(delta[0] + delta[1], [1.0] * 3 + [-0.5] * 2, [3.0, 0.4, 1.0, 1.5, 0.3]):
        rho = math.exp(d)
        terms.append(-min(rho * a, min(max(rho, 0.8), 1.28) * a) * min(w, 2.0))
    assert loss.item() == pytest.approx(sum(terms) / 5, abs=1e-12)
    assert metrics["correction/clipped_frac"] == pytest.approx(1 / 5)


def pg_batch(seed=0, B=6, T=6):
    """A random batch with every field any policy-gradient algorithm reads, and the trainer's fields."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.arange(T)[None, :]
    mask = ((cols >= 2) & (cols < 2 + torch.randint(1, T - 1, (B, 1), generator=g))).long()
    old = -torch.rand(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g) * mask
    return Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                 response_mask=mask, old_logp=old, rollout_logp=old.clone(), values=values,
                 rewards=torch.tensor([1.0, 0, 1, 0, 0, 1]), group_ids=torch.tensor([0, 0, 0, 1, 1, 1]),
                 entropy=torch.rand(B, T, generator=g), new_values=values + 0.1 * mask), \
        old + 0.1 * torch.randn(B, T, generator=g) * mask


@pytest.mark.parametrize("name", sorted(available()))
def test_every_algorithm_weights_its_policy_loss(name):
    """All policy losses pass through PolicyGradient.compute_loss, whichever class defines policy_loss (gspo,
    reinforce, rloo) or extends compute_loss (ppo): mu = pi_prox gives the uncorrected loss exactly, and a
    uniform weight of 2 (rollout_logp = old_logp - log 2) doubles the policy loss."""
    b, logp = pg_batch()
    plain = dict(beta=0.0, entropy_coef=0.0) | ({"vf_coef": 0.0} if name == "ppo" else {})
    b = get_algorithm(name, **plain).compute_advantages(b)
    base, _ = get_algorithm(name, **plain).compute_loss(logp, b)
    for mode in ("tis", "mis"):
        for level in ("token", "sequence"):
            algo = get_algorithm(name, **plain, rollout_correction=mode, rollout_correction_cap=3.0,
                                 rollout_correction_level=level)
            same, metrics = algo.compute_loss(logp, b)
            assert torch.equal(same, base) and metrics["correction/weight_mean"] == 1.0
            if level == "token":  # a sequence weight would be 2^length
                halved_mu = b.replace(rollout_logp=b.old_logp - math.log(2) * b.response_mask)
                doubled, _ = algo.compute_loss(logp, halved_mu)
                assert doubled.item() == pytest.approx(2 * base.item(), rel=1e-5)  # w = 2 up to float32 rounding


def test_trainer_logprobs_equal_the_training_forward(tiny_gpt):
    model, tok = tiny_gpt
    batch = NativeEngine(model, tok).generate([tok.encode_prompt(p) for p in ("12+3=", "4+56=", "7+8=")], 3,
                                              SamplingParams(max_new_tokens=5), seed=1)
    trainer = Trainer(model, TrainerConfig(lr=0.0, micro_batch_size=4))  # 9 rows: micro-batches of 4, 4, 1
    model.train()
    prox = trainer.logprobs(batch)
    assert model.training and not prox.requires_grad and prox.shape == batch.input_ids.shape
    assert (prox[batch.response_mask == 0] == 0).all()
    seen = []

    def record(logp, mb):  # the log-probs the trainer's own forward hands to the loss
        seen.append(logp.detach() * mb.response_mask)
        return (logp * 0).sum(), {}

    trainer.step(batch, record)
    assert torch.allclose(prox, torch.cat(seen), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(prox, token_logprobs(model, batch) * batch.response_mask, atol=1e-5)
    assert torch.allclose(prox, batch.old_logp, atol=1e-4)  # the engine sampled with the same weights


def test_a_controller_step_with_tis_hands_the_loss_both_log_probs(tiny_gpt):
    model, tok = tiny_gpt
    rows = [{"prompt": f"{a}+{b}=", "answer": "0"} for a in range(10, 14) for b in range(2)]
    engine = NativeEngine(model, tok)
    trainer = SpyTrainer(model, TrainerConfig(lr=1e-3, micro_batch_size=5))
    algo = get_algorithm("grpo", beta=0.0, rollout_correction="tis", rollout_correction_cap=2.0)
    roles = Roles(engine=engine, reward=Reward(lambda completion, row: float(len(completion) % 2), tok),
                  algorithm=algo, trainer=trainer, weight_sync=WeightSync(model, engine))
    ctl = Controller(roles, RLConfig(), SamplingParams(max_new_tokens=4), RolloutConfig(prompts_per_step=3, k=4),
                     rows=rows, prompt_ids=[tok.encode_prompt(r["prompt"]) for r in rows], seed=0)
    for step in (1, 2):
        metrics = ctl.step(step)
        batch = trainer.seen[-1]
        assert batch.rollout_logp is not None
        assert torch.allclose(batch.rollout_logp, batch.old_logp, atol=1e-4)  # colocated: same weights
        assert metrics["correction/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert metrics["correction/clipped_frac"] == 0.0
        assert sum(metrics[k] for k in hist_keys()) == pytest.approx(1.0)
        assert metrics["rollout/logp_mismatch_max"] < 1e-4  # measured against the engine's log-probs


# ---------------------------------------------------------------------------- the statistical test
#
# A softmax bandit: a 1-token prompt, 1-token responses a in {0..K-1} ("arms"), pi_theta = softmax(theta),
# reward r(a), advantage A = r(a) (no baseline). J(theta) = sum_a pi(a) r(a), so
#     grad J = sum_a pi(a) r(a) (e_a - pi)          (grad log pi(a) = e_a - pi)
# Samples come from a stale policy mu = softmax(theta_stale). Each estimator's expectation is a finite sum:
#     uncorrected REINFORCE      sum_a mu(a) r(a) (e_a - pi)
#     uncorrected GRPO           sum over arms PPO's clip keeps (ratio pi/mu within [0.8, 1.28] or on the
#                                advantage's safe side) of mu(a) (pi/mu)(a) r(a) (e_a - pi)
#     tis(c)                     sum_a mu(a) min(w_a, c) r(a) (e_a - pi),  bias = -E_mu[(w - min(w, c)) r grad log pi]
#     mis(c)                     sum_a mu(a) w_a 1{1/c <= w_a <= c} r(a) (e_a - pi)
# The loss runs through the real algorithm code with logp carrying grad wrt theta; M independent batches of
# N samples share one backward (batch m reads its own copy theta[m], so theta.grad[m] is batch m's gradient).

THETA = torch.tensor([0.5, 0.2, 0.0, -0.2, -0.5], dtype=D)
THETA_STALE = torch.tensor([-0.3, 0.0, 0.2, 0.1, 0.0], dtype=D)
R = torch.tensor([1.0, 0.6, 0.2, -0.4, -1.0], dtype=D)
M, N = 2000, 32
PI, MU = THETA.softmax(0), THETA_STALE.softmax(0)
W = PI / MU                                   # 2.13, 1.17, 0.78, 0.71, 0.58
SCORE = torch.eye(len(THETA), dtype=D) - PI   # row a: grad log pi(a)


def expected(coef):
    """sum_a mu(a) coef(a) r(a) grad log pi(a): the expectation of an estimator weighting arm a by coef(a)."""
    return (MU * coef * R) @ SCORE


TRUE = expected(W)  # = sum_a pi(a) r(a) (e_a - pi)


def bandit_gradients(name, seed=0, stale_old_logp=False, length=1, **params):
    """[M, K]: M independent batch estimates of grad J through get_algorithm(name).compute_loss. With length L > 1
    a response is L arms drawn independently from the same policy and its reward is the product of theirs."""
    g = torch.Generator().manual_seed(seed)
    arms = torch.multinomial(MU.expand(M * length, -1), N, replacement=True, generator=g)  # [M*L, N]
    arms = arms.reshape(M, length, N).transpose(1, 2).reshape(M * N, length)
    owner = torch.arange(M).repeat_interleave(N)
    theta = THETA.expand(M, -1).clone().requires_grad_(True)
    zero = torch.zeros(M * N, 1, dtype=D)
    logp = torch.cat([zero, theta.log_softmax(1)[owner[:, None], arms]], 1)   # column 0 is the prompt
    rollout = torch.cat([zero, MU.log()[arms]], 1)
    mask = torch.cat([torch.zeros(M * N, 1, dtype=torch.long), torch.ones_like(arms)], 1)
    batch = Batch(input_ids=torch.cat([zero.long(), arms], 1), attention_mask=torch.ones_like(mask),
                  response_mask=mask, advantages=R[arms].prod(1, keepdim=True) * mask,
                  old_logp=rollout if stale_old_logp else logp.detach(),  # today's pipeline / proximal = current
                  rollout_logp=None if stale_old_logp else rollout)
    algo = get_algorithm(name, beta=0.0, loss_agg="seq-mean-token-sum-norm", norm_length=1, **params)
    loss, _ = algo.compute_loss(logp, batch)   # (1 / (M N)) * sum over samples of the per-sample loss
    loss.backward()
    return -theta.grad * M                     # theta.grad[m] = -(1 / M) * batch m's mean objective gradient


def check(name, target, true=TRUE, seed=0, **params):
    """Bias of the mean estimate against grad J, its relative error, and its distance in standard errors
    (worst arm) from grad J and from `target`, the estimator's analytic expectation."""
    g = bandit_gradients(name, seed, **params)
    mean, se = g.mean(0), g.std(0) / math.sqrt(M)
    return {"bias": mean - true, "rel_err": float((mean - true).norm() / true.norm()),
            "z_target": float(((mean - target) / se).abs().max()), "z_true": float(((mean - true) / se).abs().max())}


def show(label, res, analytic=None):
    extra = f", analytic bias {[round(x, 4) for x in analytic.tolist()]}" if analytic is not None else ""
    print(f"  {label:38s} measured bias {[round(x, 4) for x in res['bias'].tolist()]}, rel. error "
          f"{res['rel_err']:.3f}, {res['z_true']:.1f} SE from grad J{extra}, {res['z_target']:.1f} SE from analytic")


def test_the_correction_removes_the_bias_of_stale_rollouts():
    print(f"\n  grad J = {[round(x, 4) for x in TRUE.tolist()]}; w = pi/mu = {[round(x, 3) for x in W.tolist()]}; "
          f"{M} batches x {N} samples")
    # uncorrected, as today's pipeline: old_logp is the engine's (mu), no rollout_logp
    reinforce_none = expected(torch.ones_like(W))
    res = check("reinforce", reinforce_none, seed=1, stale_old_logp=True, baseline="none")
    show("reinforce, none", res, reinforce_none - TRUE)
    assert res["z_true"] > 8 and res["z_target"] < 4 and res["rel_err"] > 0.3  # analytic: 0.418
    kept = ~(((W > 1.28) & (R > 0)) | ((W < 0.8) & (R < 0)))   # arms 0, 3 and 4 are clipped away
    grpo_none = expected(W * kept)
    res = check("grpo", grpo_none, seed=2, stale_old_logp=True)
    show("grpo, none (clip around mu)", res, grpo_none - TRUE)
    assert res["z_true"] > 8 and res["z_target"] < 4 and res["rel_err"] > 0.8  # analytic: 1.07

    # corrected with a cap above every weight (max w = 2.13): plain importance sampling, unbiased
    for seed, (name, mode) in enumerate([("grpo", "tis"), ("grpo", "mis"), ("reinforce", "tis"), ("rloo", "mis")], 3):
        res = check(name, TRUE, seed=seed, rollout_correction=mode, rollout_correction_cap=3.0)
        show(f"{name}, {mode} cap 3", res)
        assert res["z_true"] < 4 and res["rel_err"] < 0.05

    # a small cap: the measured bias is the analytic truncation / masking bias
    tis_bias = -expected(W - W.clamp(max=1.5))
    res = check("grpo", TRUE + tis_bias, seed=7, rollout_correction="tis", rollout_correction_cap=1.5)
    show("grpo, tis cap 1.5", res, tis_bias)
    assert res["z_target"] < 4 and res["z_true"] > 8
    mis_bias = -expected(W * ((W < 1 / 1.5) | (W > 1.5)))
    res = check("grpo", TRUE + mis_bias, seed=8, rollout_correction="mis", rollout_correction_cap=1.5)
    show("grpo, mis cap 1.5", res, mis_bias)
    assert res["z_target"] < 4 and res["z_true"] > 8


def test_a_sequence_reward_needs_the_sequence_level_weight():
    """Responses of two arms, reward r(a1) * r(a2), J = (E_pi r)^2. The sequence weight w(a1) w(a2) corrects the
    whole response's distribution; a token's own weight leaves the other token's reward under mu, so token-level
    IS converges to sum_ab mu_a mu_b r_a r_b (w_a grad log pi(a) + w_b grad log pi(b)) = 2 (E_mu r) h, not
    2 (E_pi r) h with h = grad E_pi r."""
    def pairs(coef_a, coef_b):  # sum over both arms of mu_a mu_b r_a r_b (coef_a score_a + coef_b score_b)
        rr = MU[:, None] * MU[None, :] * R[:, None] * R[None, :]
        return torch.einsum("ab,ab,ak->k", rr, coef_a, SCORE) + torch.einsum("ab,ab,bk->k", rr, coef_b, SCORE)

    ones = torch.ones(len(W), len(W), dtype=D)
    true = pairs(W[:, None] * W[None, :], W[:, None] * W[None, :])   # = 2 (E_pi r) h
    assert torch.allclose(true, 2 * (PI @ R) * TRUE)
    print(f"\n  two-arm responses: grad J = {[round(x, 4) for x in true.tolist()]}")
    res = check("grpo", true, true=true, seed=9, length=2, rollout_correction="tis", rollout_correction_cap=5.0,
                rollout_correction_level="sequence")  # max sequence weight 2.13^2 = 4.54
    show("grpo, tis sequence cap 5", res)
    assert res["z_true"] < 4 and res["rel_err"] < 0.05
    token = pairs(W[:, None] * ones, ones * W[None, :])
    res = check("grpo", token, true=true, seed=10, length=2, rollout_correction="tis", rollout_correction_cap=5.0)
    show("grpo, tis token cap 5", res, token - true)
    assert res["z_target"] < 4 and res["z_true"] > 8


def test_the_recipe_keys_reach_the_loss_end_to_end(tmp_path):
    """`algorithm.rollout_correction*` from the command line, through PPO's epochs x minibatches: the
    correction's metrics are in metrics.jsonl and the weights stay near 1 (colocated: no staleness)."""
    cfg = load_config(None, ["algorithm.name=ppo", "algorithm.rollout_correction=mis",
                             "algorithm.rollout_correction_cap=3", "algorithm.rollout_correction_level=sequence",
                             "sft.steps=1", "rl.steps=2", "rl.eval_every=0", "task.num_eval=4",
                             "rollout.prompts_per_step=2", "rollout.k=4", "trainer.epochs=2", "trainer.minibatches=2",
                             "model.n_layer=1", "model.n_embd=32", "model.n_head=2", f"out_dir={tmp_path}",
                             "run_name=corr"])
    assert train(cfg)["status"] == "ok"
    lines = [json.loads(x) for x in (tmp_path / "corr" / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in lines if m["stage"] == "rl"]
    assert len(rl) == 2
    for m in rl:
        assert m["correction/masked_frac"] == 0.0 and m["correction/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert sum(m[k] for k in hist_keys()) == pytest.approx(1.0)
