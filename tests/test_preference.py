"""The DPO family: every loss against hand-computed values and its paper's formula, masking, the data
module's error paths, the reference cache, the offline loop and the `rlpost dpo` command."""

import json
import math
import os

import pytest
import torch

from rlpost.config import PreferenceConfig
from rlpost.preference import SeqLogps, available, get_preference_loss, sequence_logps
from rlpost.preference.data import (PreferenceDataError, load_preferences, pairs_from_samples,
                                    read_preference_rows, tokenize_preferences)
from rlpost.preference.fit import cache_reference, make_loss_fn, train_preference


def softplus(x):  # -log sigma(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def pairs(chosen, rejected, len_c=None, len_r=None, interleave=True):
    """SeqLogps of pairs; rows interleaved (c0 r0 c1 r1 ...) or chosen-first, which must not matter."""
    n = len(chosen)
    len_c, len_r = len_c or [1.0] * n, len_r or [1.0] * n
    rows = [(c, lc, 1.0, i) for i, (c, lc) in enumerate(zip(chosen, len_c))] + \
           [(r, lr, 0.0, i) for i, (r, lr) in enumerate(zip(rejected, len_r))]
    if interleave:
        rows = [x for i in range(n) for x in (rows[i], rows[n + i])]
    t = list(zip(*rows))
    return SeqLogps(torch.tensor(t[0], dtype=torch.float64), torch.tensor(t[1], dtype=torch.float64),
                    torch.tensor(t[2]), torch.tensor(t[3]))


# policy / reference sums of log-probs for two pairs
PC, PR, RC, RR = [-1.0, -2.0], [-3.0, -1.0], [-1.5, -2.0], [-2.0, -1.5]


def test_dpo_matches_the_paper_formula_and_hand_values():
    loss, m = get_preference_loss("dpo", beta=0.1)(pairs(PC, PR), pairs(RC, RR))
    # h = (pi_w - ref_w) - (pi_l - ref_l): pair 0: 0.5 - (-1.0) = 1.5; pair 1: 0.0 - 0.5 = -0.5
    assert loss.item() == pytest.approx((softplus(0.15) + softplus(-0.05)) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.6697, abs=1e-4)  # by hand: (ln 1.86071 + ln 2.05127) / 2
    # the implicit reward is beta * (log pi - log pi_ref), from its definition
    assert m["pref/reward_chosen"] == pytest.approx(0.1 * (0.5 + 0.0) / 2)
    assert m["pref/reward_rejected"] == pytest.approx(0.1 * (-1.0 + 0.5) / 2)
    assert m["pref/reward_margin"] == pytest.approx(0.1 * (1.5 - 0.5) / 2)
    assert m["pref/accuracy"] == 0.5
    assert m["pref/logp_chosen"] == pytest.approx(-1.5) and m["pref/logp_rejected"] == pytest.approx(-2.0)
    assert m["pref/logp_chosen_vs_ref"] == pytest.approx(0.25)
    # equal policy and reference: loss log 2, zero margin
    loss0, _ = get_preference_loss("dpo")(pairs(PC, PR), pairs(PC, PR))
    assert loss0.item() == pytest.approx(math.log(2))
    # conservative DPO
    loss_ls, _ = get_preference_loss("dpo", beta=0.1, label_smoothing=0.2)(pairs(PC, PR), pairs(RC, RR))
    want = sum(0.8 * softplus(z) + 0.2 * softplus(-z) for z in (0.15, -0.05)) / 2
    assert loss_ls.item() == pytest.approx(want, abs=1e-12)


def test_pair_order_in_the_batch_does_not_matter():
    a, _ = get_preference_loss("dpo")(pairs(PC, PR), pairs(RC, RR))
    b, _ = get_preference_loss("dpo")(pairs(PC, PR, interleave=False), pairs(RC, RR, interleave=False))
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_ipo_average_logprob_convention_and_sum_convention():
    lc, lr = [2.0, 4.0], [1.0, 2.0]
    pol, ref = pairs(PC, PR, lc, lr), pairs(RC, RR, lc, lr)
    beta = 0.5  # target margin 1 / (2 beta) = 1
    loss, m = get_preference_loss("ipo", beta=beta)(pol, ref)
    h0 = (-1.0 / 2 - -1.5 / 2) - (-3.0 / 1 - -2.0 / 1)  # per-token log-ratio difference: 0.25 + 1 = 1.25
    h1 = (-2.0 / 4 - -2.0 / 4) - (-1.0 / 2 - -1.5 / 2)  # 0 - 0.25 = -0.25
    assert loss.item() == pytest.approx(((h0 - 1) ** 2 + (h1 - 1) ** 2) / 2, abs=1e-12)
    assert loss.item() == pytest.approx((0.0625 + 1.5625) / 2, abs=1e-12)
    assert m["pref/reward_margin"] == pytest.approx(beta * (h0 + h1) / 2)
    loss_sum, _ = get_preference_loss("ipo", beta=beta, average_logprobs=False)(pol, ref)
    assert loss_sum.item() == pytest.approx(((1.5 - 1) ** 2 + (-0.5 - 1) ** 2) / 2, abs=1e-12)


def kto_rows(logp, ref, labels, kl_pol, kl_ref):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    n = len(logp)
    pol = SeqLogps(t(logp), t([1.0] * n), torch.tensor(labels), torch.arange(n), t(kl_pol))
    return pol, SeqLogps(t(ref), t([1.0] * n), torch.tensor(labels), torch.arange(n), t(kl_ref))


def test_kto_reference_point_and_weights():
    # rewards r = logp - ref = [1, -1, 0.5]; KL estimate mean([0.4, 0.2] - [0, 0]) = 0.3
    pol, ref = kto_rows([-1.0, -3.0, -1.5], [-2.0, -2.0, -2.0], [1.0, 0.0, 0.0], [-1.6, -1.8], [-2.0, -2.0])
    loss, m = get_preference_loss("kto", beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)(pol, ref)
    z = 0.3
    want = (2.0 * (1 - sigmoid(0.5 * (1 - z))) + 0.5 * (1 - sigmoid(0.5 * (z + 1)))
            + 0.5 * (1 - sigmoid(0.5 * (z - 0.5)))) / 3
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["pref/kl_ref"] == pytest.approx(0.3)
    assert m["pref/reward_chosen"] == pytest.approx(0.5) and m["pref/reward_rejected"] == pytest.approx(-0.125)
    # a negative KL estimate is clamped to 0
    pol, ref = kto_rows([-1.0], [-2.0], [1.0], [-3.0], [-2.0])
    loss, m = get_preference_loss("kto", beta=1.0)(pol, ref)
    assert m["pref/kl_ref"] == 0.0 and loss.item() == pytest.approx(1 - sigmoid(1.0))


def test_kto_reference_point_gets_no_gradient():
    pol, ref = kto_rows([-1.0, -3.0], [-2.0, -2.0], [1.0, 0.0], [-1.0, -1.0], [-2.0, -2.0])
    pol.logp.requires_grad_(True)
    pol.kl_logp.requires_grad_(True)
    loss, _ = get_preference_loss("kto")(pol, ref)
    loss.backward()
    assert pol.kl_logp.grad is None and pol.logp.grad.abs().sum() > 0


def test_orpo_odds_ratio_on_length_averaged_logprobs_plus_nll():
    lc, lr = [2.0, 4.0], [1.0, 2.0]
    loss, m = get_preference_loss("orpo", beta=0.25)(pairs(PC, PR, lc, lr), None)

    def log_odds(avg):
        p = math.exp(avg)
        return math.log(p / (1 - p))

    total = 0.0
    for c, r, a, b in zip(PC, PR, lc, lr):
        ratio = log_odds(c / a) - log_odds(r / b)
        total += -c / a + 0.25 * softplus(ratio)
    assert loss.item() == pytest.approx(total / 2, abs=1e-10)
    assert m["pref/nll_chosen"] == pytest.approx((0.5 + 0.5) / 2)
    # a completion of probability 1 stays finite
    loss1, _ = get_preference_loss("orpo")(pairs([0.0], [-1.0]), None)
    assert torch.isfinite(loss1)


def test_simpo_length_normalised_margin_minus_gamma_without_reference():
    lc, lr = [2.0, 4.0], [1.0, 2.0]
    loss, m = get_preference_loss("simpo", beta=2.0, gamma=0.5)(pairs(PC, PR, lc, lr), None)
    z0 = 2.0 * (-1.0 / 2) - 2.0 * (-3.0 / 1) - 0.5  # 4.5
    z1 = 2.0 * (-2.0 / 4) - 2.0 * (-1.0 / 2) - 0.5  # -0.5
    assert loss.item() == pytest.approx((softplus(z0) + softplus(z1)) / 2, abs=1e-12)
    assert m["pref/reward_margin"] == pytest.approx((5.0 + 0.0) / 2)
    assert not get_preference_loss("simpo").uses_reference and not get_preference_loss("orpo").uses_reference


def test_registry_errors_name_the_valid_choices():
    assert set(available()) == {"dpo", "ipo", "kto", "orpo", "simpo"}
    with pytest.raises(ValueError, match="valid preference losses: dpo, ipo, kto, orpo, simpo"):
        get_preference_loss("dpp")
    with pytest.raises(ValueError, match="'gamma'.*valid parameters: beta, label_smoothing"):
        get_preference_loss("dpo", gamma=1.0)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        get_preference_loss("dpo")(pairs(PC, PR), None)


def test_masked_positions_never_change_a_sequence_logp():
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, 0.0, -1.0, -3.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    total, length = sequence_logps(logp, mask)
    assert total.tolist() == [-3.0, -4.0] and length.tolist() == [2.0, 2.0]
    poisoned = torch.where(mask.bool(), logp, torch.tensor(float("nan")))
    poisoned[0, 3] = float("-inf")
    assert sequence_logps(poisoned, mask)[0].tolist() == [-3.0, -4.0]


# ---------------------------------------------------------------------------- data

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_malformed_rows_are_all_reported_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        "{not json",
        {"prompt": "1+2=", "chosen": "3"},
        {"prompt": 7, "chosen": "3", "rejected": "4"},
        {"prompt": "1+3=", "chosen": "4", "rejected": ["x"]},
        {"prompt": "1+4=", "completion": "5", "label": True},
        {"text": "hello"},
    ])
    with pytest.raises(PreferenceDataError) as e:
        read_preference_rows(path)
    msg = str(e.value)
    assert "6 malformed row(s)" in msg
    for n in (2, 3, 4, 5, 6, 7):
        assert f"line {n}:" in msg
    assert "missing required key(s) 'rejected'" in msg and "not valid JSON" in msg
    assert "unpaired row in paired data" in msg
    with pytest.raises(PreferenceDataError, match="not found"):
        read_preference_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(PreferenceDataError, match="no rows"):
        read_preference_rows(write_jsonl(tmp_path / "empty.jsonl", []))


def test_a_byte_order_mark_is_read_and_bytes_that_are_not_utf8_are_named_by_line(tmp_path):
    """The prompt files' reader takes a UTF-8 byte-order mark and names a line that is not UTF-8; the preference
    reader refused the first line of a file with a BOM as 'not valid JSON (Unexpected UTF-8 BOM)', and a Latin-1
    byte failed the whole file with a bare UnicodeDecodeError naming no file or line."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\r\n'
                    b'{"prompt": "1+2=", "chosen": "3", "rejected": "4"}\r\n')
    assert [r["chosen"] for r in read_preference_rows(str(bom))] == ["2", "3"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
                      b'{"prompt": "caf\xe9=", "chosen": "3", "rejected": "4"}\n')
    with pytest.raises(PreferenceDataError, match=r"latin.jsonl: 1 malformed row\(s\):\n  line 2: not valid UTF-8 "
                                                  r"\(byte 0xe9 at column 16: .*save the file as UTF-8"):
        read_preference_rows(str(latin))


BAD = [
    {"prompt": "11+22=", "chosen": "033", "rejected": "034"},
    {"prompt": "11+23=", "chosen": "034", "rejected": "034"},
    {"prompt": "11+24=", "chosen": "035", "rejected": "  "},
    {"prompt": "1" * 30 + "=", "chosen": "0", "rejected": "1"},
    {"prompt": "11+25=", "chosen": "036", "rejected": "0" * 20},
    {"prompt": "11+26=", "chosen": "037", "rejected": "abc"},
]


def test_bad_rows_are_named_skipped_and_counted_or_stop_the_run(tmp_path, tiny_gpt):
    _, tok = tiny_gpt
    path = write_jsonl(tmp_path / "p.jsonl", BAD)
    data = load_preferences(path, tok, max_length=24)
    assert len(data) == 1 and data.where == ["line 1"] and len(data.skipped) == 5
    text = "\n".join(data.skipped)
    assert "line 2: chosen and rejected are identical" in text
    assert "line 3: empty rejected completion" in text
    assert "line 4: the prompt is 32 tokens" in text and "context of 24" in text
    assert "line 5: prompt + rejected is 28 tokens, longer than the context of 24" in text
    assert "line 6:" in text and "not in gpt_mini's vocabulary" in text
    with pytest.raises(PreferenceDataError) as e:
        load_preferences(path, tok, max_length=24, on_bad_row="raise")
    assert "5 bad preference row(s)" in str(e.value) and all(f"line {n}" in str(e.value) for n in range(2, 7))
    with pytest.raises(PreferenceDataError, match="no usable preference rows"):
        load_preferences(write_jsonl(tmp_path / "q.jsonl", BAD[1:3]), tok, max_length=24)


def test_tokenised_pairs_have_the_rollout_layout(tiny_gpt):
    _, tok = tiny_gpt
    rows = read_preference_rows([{"prompt": "1+2=", "chosen": "3", "rejected": "12"},
                                 {"prompt": "10+20=", "chosen": "30", "rejected": "3"}])
    data = tokenize_preferences(rows, tok, max_length=24)
    assert data.paired and len(data) == 2 and data.labels == [1.0, 0.0, 1.0, 0.0] and data.pairs == [0, 0, 1, 1]
    assert data.completions[1] == tok.encode_completion("12") + [tok.eos_token_id]
    b = data.batch(data.sequences([0, 1]), tok.pad_token_id)
    assert b.input_ids.shape[0] == 4 and b.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert b.response_mask.sum(1).tolist() == [2, 3, 3, 2]  # completion + eos
    P = b.prompt_width
    assert tok.decode(b.input_ids[0, P:].tolist()) == "3" and tok.decode(b.input_ids[3, :P].tolist()) == "10+20="


def test_huggingface_datasets_in_memory_and_saved_to_disk(tmp_path, tiny_gpt):
    datasets = pytest.importorskip("datasets")
    _, tok = tiny_gpt
    ds = datasets.Dataset.from_list([{"prompt": "1+2=", "completion": "3", "label": True},
                                     {"prompt": "1+2=", "completion": "4", "label": False},
                                     {"prompt": "2+2=", "completion": "", "label": True}])
    data = load_preferences(ds, tok, max_length=24)
    assert not data.paired and len(data) == 2 and data.labels == [1.0, 0.0]
    assert data.skipped == ["row 3: empty completion completion"]
    assert data.kl_completions == [data.completions[1], data.completions[0]]  # mismatched pairs for KTO
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_preferences(str(tmp_path / "saved"), tok, max_length=24)) == 2


def test_chat_templates_are_applied_for_hf_tokenizers(tiny_llama_dir):
    from transformers import AutoTokenizer

    from rlpost.models import HFTokenizer

    from rlpost.config import ModelConfig
    from rlpost.models import load_model
    from rlpost.preference.data import model_context

    assert model_context(load_model(ModelConfig(name=tiny_llama_dir))[0]) == 64  # max_position_embeddings
    raw = AutoTokenizer.from_pretrained(tiny_llama_dir)
    raw.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    msgs = [{"role": "user", "content": "12+30="}]
    rows = read_preference_rows([{"prompt": msgs, "chosen": [{"role": "assistant", "content": "042"}],
                                  "rejected": "043"}])
    assert rows[0]["chosen"] == "042"
    templated = raw.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    for tok in (HFTokenizer(raw), HFTokenizer(raw, chat_template=True)):  # message lists always get it
        data = tokenize_preferences(rows, tok, max_length=64)
        assert data.prompts[0] == list(templated)
    # a string prompt gets the template when model.chat_template=true, as rollout encodes it
    data = tokenize_preferences(read_preference_rows([{"prompt": "12+30=", "chosen": "042", "rejected": "043"}]),
                                HFTokenizer(raw, chat_template=True), max_length=64)
    assert data.prompts[0] == list(templated)
    assert data.completions[0] == raw("042", add_special_tokens=False)["input_ids"] + [raw.eos_token_id]
    # without a template, a message-list prompt is a bad row naming the reason
    raw.chat_template = None
    data = tokenize_preferences(rows + read_preference_rows([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]),
                                HFTokenizer(raw), max_length=64)
    assert len(data) == 1 and "needs a tokenizer with a chat template" in data.skipped[0]


# ---------------------------------------------------------------------------- the offline loop

def arithmetic_pairs(n, seed=0):
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        wrong = (a + b + rng.choice([1, 10, -1])) % 200
        out.append({"prompt": f"{a:02d}+{b:02d}=", "chosen": f"{a + b:03d}", "rejected": f"{wrong:03d}"})
    return out


def test_padding_does_not_change_a_pairs_logps(tiny_gpt):
    model, tok = tiny_gpt
    rows = read_preference_rows([{"prompt": "1+2=", "chosen": "3", "rejected": "4"},
                                 {"prompt": "10+20+30+40=", "chosen": "100", "rejected": "1000000"}])
    data = tokenize_preferences(rows, tok, max_length=24)
    alone = data.batch([0, 1], tok.pad_token_id)
    together = data.batch([0, 1, 2, 3], tok.pad_token_id)
    assert together.input_ids.shape[1] > alone.input_ids.shape[1]  # row 0 is now padded on both sides
    from rlpost.preference.data import model_context
    assert model_context(model) == 24  # gpt_mini's block_size: the default preference.max_length
    from rlpost.models import token_logprobs
    with torch.no_grad():
        a = sequence_logps(token_logprobs(model, alone), alone.response_mask)[0]
        b = sequence_logps(token_logprobs(model, together), together.response_mask)[0][:2]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_reference_logps_are_computed_once_and_cached(tiny_gpt):
    import copy

    model, tok = tiny_gpt
    data = tokenize_preferences(read_preference_rows(arithmetic_pairs(20)), tok, max_length=24)
    initial = copy.deepcopy(model)
    calls = {"n": 0}
    hook = model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    train_preference(model, tok, data, get_preference_loss("dpo"), PreferenceConfig(epochs=2, batch_size=10, lr=1e-3,
                                                                                    warmup_steps=0), log_every=100)
    hook.remove()
    # one reference pass over the 40 sequences (one chunk of 64), then one pass per step (2 x 2 epochs);
    # each pass is two forwards, since a pair's two rows share their prompt (token_logprobs' shared path)
    assert calls["n"] == 2 * (1 + 4)
    fresh = tokenize_preferences(read_preference_rows(arithmetic_pairs(20)), tok, max_length=24)
    cache_reference(initial, fresh, tok.pad_token_id)
    for a, b in zip(data.ref, fresh.ref):
        torch.testing.assert_close(a, b)
    # a second run on the same data reuses the cache: no reference pass
    calls["n"] = 0
    hook = model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    train_preference(model, tok, data, get_preference_loss("dpo"),
                     PreferenceConfig(epochs=1, batch_size=20, lr=1e-3, warmup_steps=0))
    hook.remove()
    assert calls["n"] == 2  # the one training pass (two forwards)


def test_micro_batches_sum_to_the_whole_batch_loss(tiny_gpt):
    from rlpost.models import token_logprobs

    model, tok = tiny_gpt
    data = tokenize_preferences(read_preference_rows(arithmetic_pairs(6)), tok, max_length=24)
    cache_reference(model, data, tok.pad_token_id)
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.05)  # policy != reference
    batch = data.batch(data.sequences(list(range(6))), tok.pad_token_id)
    for name in ("dpo", "ipo", "orpo", "simpo"):
        fn = make_loss_fn(get_preference_loss(name))
        whole, _ = fn(token_logprobs(model, batch), batch)
        parts = sum(fn(token_logprobs(model, mb), mb)[0] for mb in batch.micro_batches(4))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("name", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_every_loss_trains_toward_the_chosen_completions(tiny_gpt, name):
    model, tok = tiny_gpt
    data = tokenize_preferences(read_preference_rows(arithmetic_pairs(16)), tok, max_length=24)
    logged = []
    eval_data = tokenize_preferences(read_preference_rows(arithmetic_pairs(8)), tok, max_length=24)
    m = train_preference(model, tok, data, get_preference_loss(name),
                         PreferenceConfig(epochs=6, batch_size=16, lr=3e-3, warmup_steps=0), log=logged.append,
                         eval_data=eval_data)
    steps = [r for r in logged if r["stage"] == "preference" and "train/loss" in r]
    assert len(steps) == (12 if name == "kto" else 6)  # KTO: 32 unpaired rows (each pair gives two)
    for key in ("train/loss", "pref/reward_margin", "pref/logp_chosen", "pref/logp_rejected", "train/grad_norm"):
        assert key in steps[0], key
    if name != "kto":
        assert "pref/accuracy" in steps[0] and "eval/pref_accuracy" in m
    assert steps[-1]["pref/reward_margin"] > steps[0]["pref/reward_margin"]
    assert steps[-1]["train/loss"] < steps[0]["train/loss"]
    assert steps[-1]["pref/logp_chosen"] - steps[-1]["pref/logp_rejected"] > \
        steps[0]["pref/logp_chosen"] - steps[0]["pref/logp_rejected"]


def test_paired_losses_refuse_unpaired_data(tiny_gpt):
    model, tok = tiny_gpt
    data = tokenize_preferences(read_preference_rows([{"prompt": "1+2=", "completion": "3", "label": True}]), tok,
                                max_length=24)
    with pytest.raises(PreferenceDataError, match="needs paired rows.*use the 'kto' loss"):
        train_preference(model, tok, data, get_preference_loss("dpo"), PreferenceConfig())


def test_pairs_from_samples_put_a_right_sample_over_a_wrong_one(tiny_gpt):
    from rlpost.env.reward import Reward
    from rlpost.rollout import SamplingParams, build_engine

    model, tok = tiny_gpt
    rows = [{"prompt": f"{i:02d}+11=", "answer": "x"} for i in range(6)]

    def even_length(completion, row):
        return float(len(completion) % 2 == 0)

    engine = build_engine("native", model, tok)
    out, stats = pairs_from_samples(engine, Reward(even_length, tok), rows,
                                    [tok.encode_prompt(r["prompt"]) for r in rows], k=8,
                                    params=SamplingParams(max_new_tokens=5), seed=0)
    assert stats["pairs/prompts"] == 6 and stats["pairs/made"] == len(out) > 0
    for p in out:
        assert even_length(p["chosen"], None) == 1.0 and even_length(p["rejected"], None) == 0.0


# ---------------------------------------------------------------------------- config and command line

def test_preference_config_is_validated_at_load_time():
    from rlpost.config import load_config

    cfg = load_config(None, ["preference.loss.name=simpo", "preference.loss.gamma=0.3"])
    assert cfg.preference.loss == {"name": "simpo", "gamma": 0.3}
    with pytest.raises(ValueError, match="valid preference losses"):
        load_config(None, ["preference.loss.name=dop"])
    with pytest.raises(ValueError, match="'gama'.*valid parameters: beta, gamma"):
        load_config(None, ["preference.loss={name: simpo, gama: 1}"])
    with pytest.raises(ValueError, match="preference.on_bad_row"):
        load_config(None, ["preference.on_bad_row=ignore"])


TINY = ["sft.steps=0", "task.num_eval=20", "eval.samples_per_prompt=1", "model.n_layer=1", "model.n_embd=32",
        "model.n_head=2", "preference.batch_size=16", "preference.epochs=1"]


def test_rlpost_dpo_on_a_preference_file_writes_a_run_directory(tmp_path, capsys):
    from rlpost.cli import main

    bad = [{"prompt": "01+01=", "chosen": "002", "rejected": "002"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", arithmetic_pairs(40) + bad)
    evals = write_jsonl(tmp_path / "heldout.jsonl", arithmetic_pairs(10, seed=1))
    rc = main(["dpo", "--loss", "ipo", *TINY, f"preference.train_file={path}", f"preference.eval_file={evals}",
               f"out_dir={tmp_path}", "run_name=dpo", "preference.loss.beta=0.5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad preference row(s)" in out and "line 41: chosen and rejected are identical" in out
    run = tmp_path / "dpo"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["preference_loss"] == "ipo"
    assert summary["preference_examples"] == 40 and summary["preference_skipped_rows"] == 1
    assert isinstance(summary["pass@1_dpo"], float) and "pass@1_rl" not in summary  # no RL stage ran
    assert "eval/pref_accuracy" in summary
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["stage"] == "preference" and "train/loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3] and "pref/accuracy" in steps[0]
    assert not [x for x in lines if x["stage"] == "rl"]
    assert (run / "checkpoints" / "preference" / "model.safetensors").exists()
    assert (run / "config.yaml").exists()
    # a bad data path is a one-line error, and the run directory says why it stopped
    rc = main(["dpo", *TINY, f"preference.train_file={tmp_path / 'nope.jsonl'}", f"out_dir={tmp_path}",
               "run_name=dpo2"])
    assert rc == 1 and "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_default_sft_dpo_rl_recipe_dpo_beats_sft(tmp_path):
    """The embedded pipeline: SFT -> DPO on the model's own verified samples -> GRPO."""
    from rlpost.config import load_config
    from rlpost.run import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "recipes", "sft_dpo_rl.yaml"), [f"out_dir={tmp_path}", "run_name=full"])
    summary = train(cfg, "sft_dpo_rl")
    assert summary["pass@1_dpo"] > summary["pass@1_sft"] + 0.05
    assert summary["pass@1_rl"] > summary["pass@1_sft"] + 0.15


def test_the_preference_loop_trains_with_its_section_and_the_trainer_sections_optimizer():
    """train_preference's Trainer: lr, constant schedule after warm-up and micro-batches (of examples: a pair is
    two rows) from `preference.*`; AdamW's other settings, the non-finite guard, precision and gradient
    checkpointing and the strategy (fsdp2: sharded) from `trainer.*`; RL's epochs, minibatches, packing and log-prob
    chunk not at all."""
    from rlpost.config import TrainerConfig
    from rlpost.preference.fit import trainer_config

    pc = PreferenceConfig(lr=1e-3, warmup_steps=5, micro_batch_size=4)
    tc = TrainerConfig(lr=9.0, weight_decay=0.2, grad_clip=0.3, adam_beta1=0.8, adam_beta2=0.98, max_nonfinite_steps=5,
                       precision="bf16", gradient_checkpointing=True, micro_batch_size=99, epochs=3, minibatches=2,
                       packing=True, logprob_chunk=7, strategy="fsdp2", lr_schedule="cosine", min_lr_ratio=0.5)
    got = trainer_config(pc, tc, rows_per_example=2)
    assert (got.lr, got.warmup_steps, got.lr_schedule, got.micro_batch_size) == (1e-3, 5, "constant", 8)
    assert trainer_config(pc, tc, rows_per_example=1).micro_batch_size == 4  # unpaired rows (KTO)
    shared = ("weight_decay", "grad_clip", "adam_beta1", "adam_beta2", "max_nonfinite_steps", "precision",
              "gradient_checkpointing", "strategy")
    assert all(getattr(got, k) == getattr(tc, k) for k in shared)
    rl_only = ("epochs", "minibatches", "logprob_chunk", "micro_batch_tokens")
    assert all(getattr(got, k) == getattr(TrainerConfig(), k) for k in rl_only)
    assert got.packing is False  # padded pairs, whatever RL's trainer.packing says
