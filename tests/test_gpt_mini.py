import json

import pytest
import torch

from rlpost.config import ModelConfig
from rlpost.models import load_model, position_ids_for, save_model
from rlpost.models.gpt_mini import GPT, CharTokenizer


def test_kv_cached_decode_equals_full_forward(tiny_gpt):
    model, _ = tiny_gpt
    model.eval()
    ids = torch.randint(3, 15, (3, 10))
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :4], cache=cache)]  # prefill 4, then one token at a time
    for t in range(4, 10):
        steps.append(model(ids[:, t:t + 1], cache=cache))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_left_padding_does_not_change_a_row(tiny_gpt):
    model, tok = tiny_gpt
    model.eval()
    ids = torch.tensor([tok.encode_prompt("12+34=")])
    alone = model(ids)[0]
    padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    out = model(padded, mask, position_ids_for(mask))[0, 3:]
    assert torch.allclose(out, alone, atol=1e-5)


def test_too_long_sequence_is_a_clear_error(tiny_gpt):
    model, _ = tiny_gpt
    with pytest.raises(ValueError, match="block_size=24: raise model.block_size"):
        model(torch.zeros(1, 30, dtype=torch.long))


def test_checkpoint_roundtrip_is_safetensors(tiny_gpt, tmp_path):
    model, tok = tiny_gpt
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again, tok2 = GPT.from_pretrained(tmp_path), CharTokenizer.from_pretrained(tmp_path)
    ids = torch.randint(3, 15, (2, 8))
    assert torch.equal(model(ids), again(ids)) and tok2.chars == tok.chars
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()  # still tied


def test_checkpoint_loads_in_transformers_as_gpt2(tiny_gpt, tmp_path):
    """What save_pretrained writes is a GPT-2 checkpoint: the model through both transformers entry points,
    the tokenizer through AutoTokenizer, computing and encoding exactly what gpt_mini does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    model, tok = tiny_gpt
    model.eval()
    save_model(model, tok, str(tmp_path))
    ids = torch.tensor([tok.encode_prompt("07+85=092"), tok.encode_prompt("12+34=046")])
    mask = torch.ones_like(ids)
    for entry in (AutoModelForCausalLM, GPT2LMHeadModel):
        hf, info = entry.from_pretrained(tmp_path, output_loading_info=True)
        assert type(hf).__name__ == "GPT2LMHeadModel" and not info["missing_keys"] and not info["unexpected_keys"]
        assert hf.config.n_positions == model.config.block_size and hf.config.eos_token_id == tok.eos_token_id
        torch.testing.assert_close(hf.eval()(input_ids=ids, attention_mask=mask).logits, model(ids, mask),
                                   atol=1e-5, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok("07+85=", add_special_tokens=False)["input_ids"] == tok.encode("07+85=")
    assert hf_tok("07+85=")["input_ids"] == tok.encode_prompt("07+85=")  # <bos> first, as encode_prompt
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.pad_token_id, tok.bos_token_id,
                                                                              tok.eos_token_id)
    assert hf_tok.decode(ids[0].tolist() + [tok.eos_token_id], skip_special_tokens=True) == "07+85=092"
    with pytest.raises(Exception):
        hf_tok("07x85=")  # an unknown character is an error there too, not a silent <unk>


def test_load_model_reads_its_checkpoint_back_exactly(tiny_gpt, tmp_path):
    model, tok = tiny_gpt
    save_model(model, tok, str(tmp_path))
    again, tok2 = load_model(ModelConfig(name=str(tmp_path)))
    assert isinstance(again, GPT) and isinstance(tok2, CharTokenizer) and tok2.chars == tok.chars
    assert again.config == model.config
    params = dict(again.named_parameters())
    assert params.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())


def test_checkpoint_of_the_older_format_still_loads(tiny_gpt, tmp_path):
    """Before the GPT-2 layout: config.json with model_type gpt_mini, nn.Linear weights, a char tokenizer.json."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    model, tok = tiny_gpt
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_mini", **asdict(model.config)}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "char", "chars": tok.chars}))
    again, tok2 = load_model(ModelConfig(name=str(tmp_path)))
    assert isinstance(again, GPT) and tok2.chars == tok.chars
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_char_tokenizer_roundtrip_and_unknown_character():
    tok = CharTokenizer("0123456789+=")
    ids = tok.encode_prompt("7+8=")
    assert ids[0] == tok.bos_token_id and tok.decode(ids + [tok.eos_token_id]) == "7+8="
    with pytest.raises(ValueError, match="'x' is not in gpt_mini's vocabulary"):
        tok.encode("7x8")
