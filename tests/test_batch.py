import pytest
import torch

from rlpost import Batch


def make(B=4, T=6):
    return Batch(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T, dtype=torch.long),
                 response_mask=torch.ones(B, T, dtype=torch.long), rewards=torch.arange(B).float(),
                 group_ids=torch.tensor([0, 0, 1, 1])[:B], meta={"tag": list("abcd")[:B]})


def test_constructible_from_keyword_tensors_with_design_field_names():
    B, T = 2, 3
    fields = dict(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=torch.ones(B, T),
                  response_mask=torch.ones(B, T), old_logp=torch.zeros(B, T), ref_logp=torch.zeros(B, T),
                  rewards=torch.zeros(B), advantages=torch.zeros(B, T), values=torch.zeros(B, T),
                  group_ids=torch.zeros(B, dtype=torch.long), policy_version=torch.zeros(B, dtype=torch.long))
    batch = Batch(**fields)
    assert len(batch) == 2 and set(batch.tensors()) == set(fields)


def test_token_level_rewards_are_accepted():
    batch = make()
    assert batch.replace(rewards=torch.zeros(4, 6)).rewards.shape == (4, 6)


@pytest.mark.parametrize("name,shape", [("old_logp", (4, 5)), ("advantages", (4,)), ("group_ids", (4, 6)),
                                        ("rewards", (3,))])
def test_wrong_shape_names_the_field(name, shape):
    with pytest.raises(ValueError, match=name):
        make().replace(**{name: torch.zeros(shape)})


def test_meta_length_is_checked():
    with pytest.raises(ValueError, match="meta"):
        make().replace(meta={"x": [1]})


def test_select_keeps_rows_and_meta_together():
    sub = make().select([3, 1])
    assert sub.rewards.tolist() == [3.0, 1.0] and sub.meta["tag"] == ["d", "b"]


def test_micro_batches_remember_whole_batch_counts():
    batch = make()
    batch.response_mask[0, :3] = 0
    mbs = list(batch.micro_batches(3))
    assert [len(m) for m in mbs] == [3, 1]
    assert all(m.global_tokens == 21 and m.global_seqs == 4 for m in mbs)


def test_from_sequences_lays_out_prompts_left_and_responses_right():
    tokens = torch.tensor([[7, 8, 2], [9, 5, 5], [6, 2, 5]])
    logps = torch.full((3, 3), -0.5)
    b = Batch.from_sequences([[3, 4], [5]], 1, tokens[:2], logps[:2], torch.tensor([3, 1]),
                             torch.tensor([True, False]), pad_id=0, version=4)
    assert b.input_ids.tolist() == [[3, 4, 7, 8, 2], [0, 5, 9, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert b.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert b.old_logp.tolist() == [[0, 0, -0.5, -0.5, -0.5], [0, 0, -0.5, 0, 0]]
    assert b.policy_version.tolist() == [4, 4] and b.meta["finish_reason"] == ["stop", "length"]
    k2 = Batch.from_sequences([[3, 4]], 2, tokens[:2], logps[:2], torch.tensor([2, 1]), torch.tensor([1, 1]), 0, 0)
    assert k2.group_ids.tolist() == [0, 0] and k2.input_ids[:, :2].tolist() == [[3, 4], [3, 4]]


def test_for_sft_trains_every_completion_token_or_only_the_marked_ones():
    b = Batch.for_sft([[3, 4], [5]], [[7, 2], [9]], pad_id=0)
    assert b.input_ids.tolist() == [[3, 4, 7, 2], [0, 5, 9, 0]]
    assert b.response_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert b.old_logp is None and b.policy_version is None and b.meta == {}
    marked = Batch.for_sft([[3, 4], [5]], [[7, 2], [9]], pad_id=0, trained=[[0, 1], [1]])
    assert marked.response_mask.tolist() == [[0, 0, 0, 1], [0, 0, 1, 0]]
    assert torch.equal(marked.input_ids, b.input_ids)
