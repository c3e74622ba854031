"""Multi-turn rows under real chat templates: an episode whose turns end on end-of-turn is, token for
token, the template's rendering of the same conversation (the glue after each turn holds what the
template writes after its end-of-turn token, such as ChatML's newline), and glue tokens are masked.

The templates are those of Qwen2.5-Instruct (ChatML), Meta-Llama-3-Instruct and Phi-3-mini-instruct,
written out from their tokenizer_config.json; each is attached to a byte-level BPE trained on the spot
with the template's special tokens added. eos is the token the model ends its turns with."""

import pytest

from conftest import train_tiny_tokenizer
from test_env_episodes import ScriptedEngine
from rlpost.env import EnvRole, Step
from rlpost.env.base import Env
from rlpost.models import HFTokenizer
from rlpost.rollout import SamplingParams
from rlpost.env.episodes import encode_observation
from rlpost.rollout.episodes import run_episodes

QWEN25 = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")

# name -> (template, special tokens, bos, eos, pad, the role an observation takes in that family)
FAMILIES = {
    "qwen2.5": (QWEN25, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", "<|endoftext|>",
                "tool"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                        "<|end_of_text|>"], "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "ipython"),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None, "<|end|>",
             "<|endoftext|>", "user"),  # Phi-3's template renders system, user and assistant messages only
}


@pytest.fixture(scope="module")
def base_tokenizer():
    return train_tiny_tokenizer([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)] + ["The result is 42."])


def family_tokenizer(base, name) -> HFTokenizer:
    import copy

    template, specials, bos, eos, pad, _ = FAMILIES[name]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, pad
    tok.chat_template = template
    return HFTokenizer(tok, chat_template=True)


class ToolTalk(Env):
    def __init__(self, role="tool", results=("46", "4")):
        self.role, self.results, self.n = role, results, 0

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn):
        self.n += 1
        if self.n > len(self.results):
            return Step(reward=1.0, done=True)
        return Step(observation=[{"role": self.role, "content": self.results[self.n - 1]}])


def episode_row(tok, turns, role, cut=()):
    env = EnvRole(make=lambda: ToolTalk(role), tokenizer=tok, max_turns=len(turns), max_tokens=200)
    batch, _ = run_episodes(ScriptedEngine(tok, turns, cut), env, [{"prompt": "12+34="}], [[0]], 1,
                            SamplingParams(max_new_tokens=50), 0)
    keep = batch.attention_mask[0].bool()
    return batch.input_ids[0][keep].tolist(), batch.response_mask[0][keep].tolist()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_multi_turn_row_is_the_templates_rendering_of_the_conversation(base_tokenizer, name):
    tok = family_tokenizer(base_tokenizer, name)
    role = FAMILIES[name][-1]
    turns = ["12+34", "46+0", "The result is 46."]
    row, mask = episode_row(tok, turns, role)
    conversation = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": turns[0]},
                    {"role": role, "content": "46"}, {"role": "assistant", "content": turns[1]},
                    {"role": role, "content": "4"}, {"role": "assistant", "content": turns[2]}]
    rendered = list(tok.tok.apply_chat_template(conversation, tokenize=True, return_dict=False))
    # the row ends on the last turn's eos; after it the template writes only its closing text
    assert row == rendered[:len(row)], (tok.tok.decode(row), tok.tok.decode(rendered))
    assert row[-1] == tok.eos_token_id
    assert tok.tok.decode(rendered[len(row):]) in ("", "\n", "\n<|end|>")
    # the policy's tokens are exactly its three turns, each with its eos; everything else is masked glue
    sampled = [t for t, m in zip(row, mask) if m]
    assert sampled == [t for text in turns for t in tok.encode_completion(text) + [tok.eos_token_id]]


def test_a_turn_cut_before_its_eos_gets_the_templates_close_from_the_environment(base_tokenizer):
    tok = family_tokenizer(base_tokenizer, "qwen2.5")
    turns = ["12+34", "The result is 46."]
    row, mask = episode_row(tok, turns, "tool", cut=(0,))
    conversation = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": turns[0]},
                    {"role": "tool", "content": "46"}, {"role": "assistant", "content": turns[1]}]
    rendered = list(tok.tok.apply_chat_template(conversation, tokenize=True, return_dict=False))
    assert row == rendered[:len(row)]
    P, first = len(tok.encode_messages(conversation[:1])), tok.encode_completion(turns[0])
    assert row[P:P + len(first)] == first and mask[P:P + len(first)] == [1] * len(first)
    assert row[P + len(first)] == tok.eos_token_id and mask[P + len(first)] == 0  # the close is the environment's


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_observation_glue_after_an_eos_starts_with_what_the_template_writes_after_it(base_tokenizer, name):
    tok = family_tokenizer(base_tokenizer, name)
    role = FAMILIES[name][-1]
    obs = [{"role": role, "content": "46"}]
    ended, cut = encode_observation(tok, obs, after_eos=True), encode_observation(tok, obs)
    assert tok.tok.decode(cut) == tok.tok.decode([tok.eos_token_id]) + tok.tok.decode(ended)
    if name != "llama3":  # ChatML and Phi-3 write a newline after the end-of-turn token; Llama 3 nothing
        assert tok.tok.decode(ended).startswith("\n")
