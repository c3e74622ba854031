import pytest
import torch

from rlpost.models import position_ids_for
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
    with pytest.raises(ValueError, match="block_size=24"):
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


def test_weights_load_into_transformers_gpt2(tiny_gpt):
    from transformers import GPT2Config, GPT2LMHeadModel

    model, _ = tiny_gpt
    model.eval()
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                    resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    missing, unexpected = hf.load_state_dict(model.to_hf_state_dict(), strict=False)
    assert not unexpected and all(".attn.bias" in k or "masked_bias" in k for k in missing)
    ids = torch.randint(3, 15, (2, 9))
    assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)


def test_char_tokenizer_roundtrip_and_unknown_character():
    tok = CharTokenizer("0123456789+=")
    ids = tok.encode_prompt("7+8=")
    assert ids[0] == tok.bos_token_id and tok.decode(ids + [tok.eos_token_id]) == "7+8="
    with pytest.raises(ValueError, match="'x' is not in gpt_mini's vocabulary"):
        tok.encode("7x8")
