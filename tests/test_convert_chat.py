"""Chat template rendering and the assistant-token mask, against transformers' apply_chat_template.

A small byte-level BPE tokenizer and a Llama-3-style template with system/user/assistant/tool turns and tool
calls are written to a directory; transformers (helper venv, tests/hf_reference.py) renders the same chats once
per test run.
"""
import json
import os

import numpy as np
import pytest

import hf_reference
from kanana_jax.convert.tokenizer_chat import ChatTemplateError, ChatTokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<tool_call>", "</tool_call>"]
TEMPLATE = """{{- bos_token }}
{%- if messages and messages[0].role == 'system' %}
{%- set system = messages[0].content %}{%- set rest = messages[1:] %}
{%- else %}
{%- set system = 'You are a helpful assistant.' %}{%- set rest = messages %}
{%- endif %}
<|start_header_id|>system<|end_header_id|>

{{ system }}
{%- if tools %}

Tools:
{%- for tool in tools %}

{{ tool | tojson }}
{%- endfor %}
{%- endif %}<|eot_id|>
{%- for m in rest %}
{%- if m.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>

{% generation %}
{%- if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}
{%- if m.content %}{{ m.content }}{% endif %}
{%- for call in m.tool_calls or [] %}<tool_call>{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}</tool_call>{% endfor %}<|eot_id|>
{%- endgeneration %}
{%- elif m.role in ['user', 'tool', 'system'] %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}<|eot_id|>
{%- else %}{{ raise_exception('unknown role ' + m.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""
UNTAGGED = TEMPLATE.replace("{% generation %}\n{%- if m.reasoning_content %}", "{% if m.reasoning_content %}").replace(
    "\n{%- endgeneration %}", "")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CHATS = {
    "simple": dict(messages=[{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "What is 2+3?"},
                             {"role": "assistant", "content": "2+3 = 5."}]),
    "tools": dict(tools=[WEATHER], messages=[
        {"role": "user", "content": "서울 날씨 어때?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}}]},
        {"role": "tool", "content": "{\"temp_c\": 21}"},
        {"role": "assistant", "content": "서울은 21도예요.", "reasoning_content": "The tool said 21."},
        {"role": "user", "content": "Thanks!"}], add_generation_prompt=True),
    "multi": dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                            {"role": "user", "content": "Count to three."},
                            {"role": "assistant", "content": "one, two, three"}]),
}


def write_tokenizer_dir(directory, template):
    """tokenizer.json (byte-level BPE trained on a few lines) + tokenizer_config.json with `template`."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    os.makedirs(directory, exist_ok=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is 2+3? 2+3 = 5.", "Hello! How can I help? one, two, three", "서울 날씨 어때? 서울은 21도예요.",
              "You are a helpful assistant. Answer briefly.", '{"name": "get_weather", "arguments": {"city": "Seoul"}}']
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 20, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|eot_id|>", "chat_template": template}, f)


@pytest.fixture(scope="session")
def reference():
    chats = [{"name": name, "tokenizer_dir": None, **chat} for name, chat in CHATS.items()]

    def prepare(out_dir):
        write_tokenizer_dir(os.path.join(out_dir, "tok"), TEMPLATE)
        for c in chats:
            c["tokenizer_dir"] = os.path.join(out_dir, "tok")
    try:
        out_dir = hf_reference.reference_outputs("chat", {"chat": chats}, prepare)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    with open(os.path.join(out_dir, "chat.json")) as f:
        return os.path.join(out_dir, "tok"), json.load(f)["chats"]


@pytest.mark.parametrize("name", list(CHATS))
def test_text_ids_and_assistant_mask_match_transformers(reference, name):
    tok_dir, chats = reference
    chat = ChatTokenizer.from_pretrained(tok_dir)
    kw = {k: v for k, v in CHATS[name].items() if k != "messages"}
    enc = chat.encode(CHATS[name]["messages"], **kw)
    want = chats[name]
    assert enc.text == want["text"]
    assert enc.ids.tolist() == want["input_ids"]
    assert enc.assistant_mask.astype(int).tolist() == want["assistant_masks"]
    n_assistant = sum(m["role"] == "assistant" for m in CHATS[name]["messages"])
    assert len(enc.spans) == n_assistant and enc.assistant_mask.sum() > 0


@pytest.mark.parametrize("name", list(CHATS))
def test_untagged_template_gives_the_same_mask_by_prefix_rendering(reference, tmp_path, name):
    tok_dir, chats = reference
    write_tokenizer_dir(tmp_path, UNTAGGED)
    chat = ChatTokenizer.from_pretrained(str(tmp_path))
    assert not chat.has_generation_tags
    kw = {k: v for k, v in CHATS[name].items() if k != "messages"}
    enc = chat.encode(CHATS[name]["messages"], **kw)
    assert enc.text == chats[name]["text"]
    assert enc.assistant_mask.astype(int).tolist() == chats[name]["assistant_masks"]
    # Masked tokens decode to exactly the assistant outputs (with their end-of-turn token).
    pieces = [enc.text[s:e] for s, e in enc.spans]
    assert all(p.endswith("<|eot_id|>") for p in pieces)
    assert "2+3 = 5." in "".join(pieces) or "one, two, three" in "".join(pieces) or "21" in "".join(pieces)


def test_template_that_rewrites_history_needs_generation_tags(tmp_path):
    template = UNTAGGED.replace("{% if m.reasoning_content %}", "{% if m.reasoning_content and loop.last %}")
    write_tokenizer_dir(tmp_path, template)
    chat = ChatTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ChatTemplateError, match="cannot delimit assistant message 1"):
        chat.encode(messages)
    with pytest.raises(ChatTemplateError, match="unknown role robot"):
        chat.render([{"role": "robot", "content": "x"}])


def test_missing_template_and_bad_syntax_are_clear_errors(tmp_path):
    write_tokenizer_dir(tmp_path, "")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        ChatTokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    chat = ChatTokenizer.from_pretrained(str(tmp_path))
    assert chat.render([{"role": "user", "content": "hi"}]) == "[user]hi"
    assert np.all(chat.encode([{"role": "user", "content": "hi"}]).assistant_mask == 0)
