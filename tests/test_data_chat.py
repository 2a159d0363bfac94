"""Chat rendering for SFT (data/chat.py) and message records (data/chat_records.py), on random conversations.

The loss mask covers exactly the assistant output (text, tool calls, end-of-turn token) for the byte tokenizer,
an HF tokenizer without a template (plain rendering) and an HF tokenizer with a chat template; prompts for
generation equal evals.runner.prompt_ids; truncation keeps whole assistant turns; bad records are named by
file, line or record, and field.
"""
import json
import os
import sys
import types

import numpy as np
import pytest
from array_record.python import array_record_module

from kanana_jax.convert.tokenizer_chat import ChatTemplateError
from kanana_jax.data import chat, chat_records, sources, tokenizer as tokenizer_lib
from kanana_jax.evals import runner
from kanana_jax.generate import tool_calls

WORDS = ["hello", "서울", "날씨", "2+3", "=", "5.", "count", "{", "}", '"q"', "</", "x_1", "\n", "Ünïcode", "🙂",
         "tool", "Assistant", "\\n", "ok?", "123", "  ", "\t", "<b>"]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look up a key",
                                           "parameters": {"type": "object", "properties": {"key": {"type": "string"}}}}}]


def words(rng, lo=1, hi=10, pad=True):
  text = " ".join([str(rng.choice(WORDS[:12]))] + list(rng.choice(WORDS, rng.integers(lo, hi) - 1)))  # not blank
  if pad and rng.random() < 0.3:
    text = " \n" + text + "  "
  return text.strip() if not pad else text


def random_chat(rng, pad=True):
  """system? then user / assistant exchanges, some with 1-2 tool calls, their results and a final answer."""
  msgs = [{"role": "system", "content": words(rng, pad=pad)}] if rng.random() < 0.5 else []
  for _ in range(rng.integers(1, 4)):
    msgs.append({"role": "user", "content": words(rng, pad=pad)})
    if rng.random() < 0.5:
      calls = [{"name": str(rng.choice(["lookup", "add"])), "arguments": {"key": words(rng, pad=False),
                                                                          "n": int(rng.integers(100))}}
               for _ in range(rng.integers(1, 3))]
      msgs.append({"role": "assistant", "content": words(rng, pad=pad) if rng.random() < 0.5 else None,
                   "tool_calls": calls})
      msgs += [{"role": "tool", "name": c["name"], "content": [words(rng, pad=False), 7, {"v": [1, "둘"]}][rng.integers(3)]}
               for c in calls]
    msgs.append({"role": "assistant", "content": words(rng, pad=pad)})
  if rng.random() < 0.3:
    msgs.append({"role": "user", "content": words(rng, pad=pad)})  # trailing, untrained
  return msgs, (TOOLS if rng.random() < 0.4 else None)


def eval_messages(msgs, tools):
  """The plain text messages the eval suites give the model (tools listed in the system prompt)."""
  out = tool_calls.to_text_messages(msgs)
  if tools:
    if out and out[0]["role"] == "system":
      out[0] = {"role": "system", "content": tool_calls.render_tools_system_prompt(tools, out[0]["content"])}
    else:
      out.insert(0, {"role": "system", "content": tool_calls.render_tools_system_prompt(tools)})
  return out


def runs(mask):
  """[start, end) of each run of 1s."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  return list(zip(edges[::2], edges[1::2]))


SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATE = """{{- bos_token }}
{%- if tools %}<|start_header_id|>system<|end_header_id|>

Tools: {{ tools | tojson }}<|eot_id|>
{%- endif %}
{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{% if m.role == 'assistant' %}{{ OPEN }}
{%- if m.content %}{{ m.content }}{% endif %}
{%- for c in m.tool_calls or [] %}<tool_call>{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>{% endfor %}<|eot_id|>{{ CLOSE }}{% elif m.content is string %}{{ m.content }}<|eot_id|>{% else %}{{ m.content | tojson }}<|eot_id|>{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def template(tagged=False, eot_inside=True):
  t = TEMPLATE.replace("{{ OPEN }}", "{% generation %}" if tagged else "")
  t = t.replace("{{ CLOSE }}", "{% endgeneration %}" if tagged else "")
  return t if eot_inside else t.replace("<|eot_id|>{% endgeneration %}", "{% endgeneration %}<|eot_id|>")


def write_hf_tokenizer(directory, chat_template=None, jinja=False):
  """A byte-level BPE tokenizer.json trained on the test words (+ tokenizer_config.json with a template)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  os.makedirs(directory, exist_ok=True)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [" ".join(WORDS), "System: User: Assistant: Tool: <tool_call> </tool_call> <tool_response>",
            '{"name": "lookup", "arguments": {"key": "서울", "n": 3}}']
  tok.train_from_iterator(corpus * 20, trainer)
  tok.save(os.path.join(directory, "tokenizer.json"))
  if chat_template is not None:
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if jinja:
      with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(chat_template)
    else:
      config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f)
  return tokenizer_lib.make_tokenizer(os.path.join(directory, "tokenizer.json"))


@pytest.fixture(scope="module")
def plain_tokenizers(tmp_path_factory):
  return {"byte": tokenizer_lib.ByteTokenizer(), "hf": write_hf_tokenizer(tmp_path_factory.mktemp("plain"))}


# ----------------------------------------------------------------------------- plain rendering


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_plain_mask_is_exactly_the_assistant_output_ending_in_eos(plain_tokenizers, kind):
  tok = plain_tokenizers[kind]
  renderer = chat.ChatRenderer.for_tokenizer(tok)
  assert isinstance(renderer, chat.PlainChatRenderer) and renderer.name == "plain"
  rng = np.random.default_rng(0)
  for _ in range(40):
    msgs, tools = random_chat(rng)
    t = renderer.encode(msgs, tools)
    assert t.ids_N.dtype == np.int32 and t.loss_mask_N.dtype == np.float32 and t.loss_mask_N[0] == 0
    assistants = [m for m in msgs if m["role"] == "assistant"]
    spans = runs(t.loss_mask_N)
    assert len(spans) == len(assistants)
    for (lo, hi), m, end in zip(spans, assistants, t.assistant_ends):
      body = " " + tool_calls.to_text_messages([m])[0]["content"].strip()
      assert t.ids_N[lo:hi].tolist() == tok.encode(body) + [tok.eos_id] and hi == end
    # Without its EOS ids the sequence is eval's text, and every message ends where eval's rendering of it does.
    no_eos = lambda ids: tok.decode([i for i in ids if i != tok.eos_id])
    want = runner.render_plain(eval_messages(msgs, tools))[:-len(chat.PLAIN_PROMPT)]
    assert no_eos(t.ids_N) == want
    if kind == "byte":
      for m, end in enumerate(t.turn_ends_M):
        assert no_eos(t.ids_N[:end]) == runner.render_plain(eval_messages(msgs[:m + 1], tools))[:-len(chat.PLAIN_PROMPT)]


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_plain_prompts_equal_eval_prompt_ids_and_eval_stops_on_the_trained_end(plain_tokenizers, kind):
  tok = plain_tokenizers[kind]
  renderer, fmt = chat.ChatRenderer.for_tokenizer(tok), runner.chat_format(tok)
  assert fmt.name == "plain" and renderer.stop_token_ids == fmt.stop_token_ids and tok.eos_id in fmt.stop_token_ids
  assert chat.PLAIN_ROLES == runner._PLAIN_ROLES and chat.END_OF_TURN_TOKENS == runner._END_OF_TURN_TOKENS
  rng = np.random.default_rng(1)
  for n in range(40):
    msgs, tools = random_chat(rng)
    if n % 10 == 0:
      msgs = [{"role": "assistant", "content": words(rng)}] + msgs  # eval's empty-history prompt '\n\nAssistant:'
    t = renderer.encode(msgs, tools)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for i in turns:
      assert renderer.render_for_generation(msgs[:i], tools) == runner.prompt_ids(tok, fmt, eval_messages(msgs[:i], tools))
    first = runs(t.loss_mask_N)[0][0]
    assert t.ids_N[:first].tolist() == renderer.render_for_generation(msgs[:turns[0]], tools)
    assert all(t.ids_N[e - 1] in fmt.stop_token_ids for e in t.assistant_ends)


def test_truncate_at_turn_keeps_whole_assistant_turns(plain_tokenizers):
  renderer = chat.ChatRenderer.for_tokenizer(plain_tokenizers["byte"])
  rng = np.random.default_rng(2)
  for _ in range(60):
    t = renderer.encode(*random_chat(rng))
    max_len = int(rng.integers(1, len(t.ids_N) + 5))
    cut = chat.truncate_at_turn(t, max_len)
    fitting = [e for e in t.assistant_ends if e <= max_len]
    if not fitting:
      assert cut is None
      continue
    n = max(fitting)
    assert len(cut.ids_N) == n and cut.ids_N.tolist() == t.ids_N[:n].tolist()
    assert cut.loss_mask_N.tolist() == t.loss_mask_N[:n].tolist() and cut.loss_mask_N[-1] == 1
    assert cut.roles_M[-1] == "assistant" and cut.turn_ends_M[-1] == n and cut.assistant_ends == fitting
    assert cut.ids_N[-1] == renderer.tokenizer.eos_id
  # max_len = the full length drops a trailing user turn (untrained tokens only).
  msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
  t = renderer.encode(msgs)
  assert chat.truncate_at_turn(t, len(t.ids_N)).roles_M == ("user", "assistant")


def test_shifted_loss_mask_marks_positions_whose_target_is_assistant(plain_tokenizers):
  tok = plain_tokenizers["byte"]
  renderer = chat.ChatRenderer.for_tokenizer(tok)
  rng = np.random.default_rng(3)
  for _ in range(20):
    msgs, tools = random_chat(rng)
    t = renderer.encode(msgs, tools)
    shifted = chat.shifted_loss_mask(t.loss_mask_N)
    assert shifted.shape == t.ids_N.shape and shifted[-1] == 0
    inputs_T, targets_T, mask_T = t.ids_N[:-1], t.ids_N[1:], shifted[:-1]  # the pipeline's next-token batch
    assert np.array_equal(mask_T, t.loss_mask_N[1:])
    trained = targets_T[mask_T > 0]
    bodies = [" " + tool_calls.to_text_messages([m])[0]["content"].strip() for m in msgs if m["role"] == "assistant"]
    assert trained.tolist() == [i for b in bodies for i in tok.encode(b) + [tok.eos_id]]
    # Each trained target's input is the token before it: the first one of a turn sees the 'Assistant:' header.
    for lo, _ in runs(mask_T):
      assert tok.decode(inputs_T[:lo + 1]).endswith("Assistant:")


# ----------------------------------------------------------------------------- HF chat template


def expected_output(m):
  calls = "".join("<tool_call>" + json.dumps(c, ensure_ascii=False) + "</tool_call>" for c in m.get("tool_calls", []))
  return (m.get("content") or "") + calls + "<|eot_id|>"


@pytest.mark.parametrize("tagged", [False, True])
def test_template_mask_is_exactly_the_assistant_output_and_prompts_agree(tmp_path, tagged):
  tok = write_hf_tokenizer(tmp_path, template(tagged), jinja=tagged)
  renderer = chat.ChatRenderer.for_tokenizer(tok)
  assert isinstance(renderer, chat.TemplateChatRenderer) and renderer.name.startswith("template:")
  eot = tok.encode("<|eot_id|>")
  assert renderer.stop_token_ids == tuple(sorted({tok.eos_id, *eot}))
  fmt = None if tagged else runner.chat_format(tok)  # eval reads tokenizer_config.json, without {% generation %}
  rng = np.random.default_rng(4)
  for _ in range(25):
    msgs, tools = random_chat(rng, pad=False)
    t = renderer.encode(msgs, tools)
    assistants = [(i, m) for i, m in enumerate(msgs) if m["role"] == "assistant"]
    spans = runs(t.loss_mask_N)
    assert len(spans) == len(assistants)
    for (lo, hi), (i, m), end in zip(spans, assistants, t.assistant_ends):
      assert renderer.chat.tokenizer.decode(t.ids_N[lo:hi].tolist(), skip_special_tokens=False) == expected_output(m)
      assert hi == end and t.ids_N[hi - 1] == eot[0]
      assert t.ids_N[:lo].tolist() == renderer.render_for_generation(msgs[:i], tools)
      if fmt is not None and not any(h.get("tool_calls") for h in msgs[:i]):  # see the xfail test below
        assert renderer.render_for_generation(msgs[:i]) == runner.prompt_ids(
            tok, fmt, renderer.template_messages(msgs[:i]))
    assert np.all(np.diff(t.turn_ends_M) >= 0) and t.turn_ends_M[-1] == len(t.ids_N)
    cut = chat.truncate_at_turn(t, t.assistant_ends[0])
    assert cut.ids_N.tolist() == t.ids_N[:t.assistant_ends[0]].tolist() and cut.roles_M[-1] == "assistant"


@pytest.mark.xfail(strict=True, reason="evals.runner.chat_format compiles the template with Jinja's own tojson "
                   "(sorted keys, \\u escapes) instead of tokenizer_chat.compile_template's (transformers')")
def test_eval_template_prompts_with_tool_calls_agree(tmp_path):
  tok = write_hf_tokenizer(tmp_path, template())
  renderer = chat.ChatRenderer.for_tokenizer(tok)
  msgs = [{"role": "user", "content": "서울?"}, {"role": "assistant", "content": None,
                                                "tool_calls": [{"name": "lookup", "arguments": {"key": "서울", "a": 1}}]},
          {"role": "tool", "name": "lookup", "content": "21"}]
  assert renderer.render_for_generation(msgs) == runner.prompt_ids(tok, runner.chat_format(tok),
                                                                   renderer.template_messages(msgs))


def test_template_whose_assistant_span_lacks_the_end_of_turn_is_refused(tmp_path):
  tok = write_hf_tokenizer(tmp_path, template(tagged=True, eot_inside=False), jinja=True)
  renderer = chat.ChatRenderer.for_tokenizer(tok)
  with pytest.raises(ChatTemplateError, match="assistant message 1 renders without an end-of-turn token"):
    renderer.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


def test_hf_tokenizer_without_template_uses_plain(tmp_path):
  tok = write_hf_tokenizer(tmp_path)
  assert isinstance(chat.ChatRenderer.for_tokenizer(tok), chat.PlainChatRenderer)
  assert runner.chat_format(tok).name == "plain"


# ----------------------------------------------------------------------------- message records


def good_record(rng):
  msgs, tools = random_chat(rng)
  return {"messages": msgs, **({"tools": tools} if tools else {}), "bucket": str(rng.choice(["chat", "tool"])),
          "id": int(rng.integers(1 << 30))}


BAD = {  # 1-based line -> (record line, expected message)
    3: ('{"messages": [', r"sft\.jsonl line 3: malformed JSON"),
    5: ({"messages": [{"role": "user", "content": "hi"}]},
        r"sft\.jsonl line 5: messages: a conversation needs at least one assistant message"),
    8: ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"arguments": {}}]}]},
        r"sft\.jsonl line 8: messages\[1\]\.tool_calls\[0\]\.name: must be a non-empty string"),
    11: ({"messages": [{"role": "user", "content": "x"},
                       {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{}"}]}]},
         r"sft\.jsonl line 11: messages\[1\]\.tool_calls\[0\]\.arguments: must be a JSON object, got str"),
    13: ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
         r"sft\.jsonl line 13: messages\[0\]\.content: must be a string, got int"),
    15: ({"text": "a document"}, r"sft\.jsonl line 15: expected a JSON object with 'messages', got keys \['text'\]"),
    17: ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                       {"role": "bot", "content": "z"}]},
         r"sft\.jsonl line 17: messages\[2\]\.role: 'bot' is not one of system\|user\|assistant\|tool"),
    19: ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
         r"sft\.jsonl line 19: messages\[1\]: an assistant message needs non-empty 'content' or 'tool_calls'"),
    20: ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "bucket": 3},
         r"sft\.jsonl line 20: bucket: must be a string"),
}


def test_jsonl_records_validated_and_bad_ones_named_by_file_line_and_field(tmp_path):
  rng = np.random.default_rng(5)
  lines, want = [], {}
  for n in range(1, 23):
    if n in BAD:
      rec = BAD[n][0]
      lines.append(rec if isinstance(rec, str) else json.dumps(rec))
    else:
      want[n] = good_record(rng)
      lines.append(json.dumps(want[n], ensure_ascii=False))
  lines.insert(9, "   ")  # a blank line is not a record: line numbers still count it
  want = {(n + 1 if n >= 10 else n): r for n, r in want.items()}
  bad = {(n + 1 if n >= 10 else n): (r, m.replace(f"line {n}:", f"line {n + 1 if n >= 10 else n}:"))
         for n, (r, m) in BAD.items()}
  path = tmp_path / "sft.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  src = chat_records.MessageRecordSource(str(path))
  assert len(src) == 22 and src.kind == "jsonl"
  line_of = [n for n in range(1, 24) if n != 10]
  renderer = chat.ChatRenderer.for_tokenizer(tokenizer_lib.ByteTokenizer())
  for i, n in enumerate(line_of):
    if n in bad:
      with pytest.raises(sources.BadRecordError, match=bad[n][1]):
        src[i]
    else:
      assert src[i] == want[n]
      assert renderer.encode(src[i]["messages"], src[i].get("tools")).loss_mask_N.sum() > 0
  # OpenAI-form tool calls are accepted and normalized; held-out split as open_source does it.
  rec = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
      {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]}
  (tmp_path / "one-train.jsonl").write_text(json.dumps(rec) + "\n")
  got = chat_records.open_message_source("jsonl", str(tmp_path / "one-{split}.jsonl"), split="train")[0]
  assert got["messages"][1]["tool_calls"] == [{"name": "f", "arguments": {"a": 1}}]
  train = chat_records.open_message_source("jsonl", str(path), split="train")
  assert len(train) == 22 and train[1] == want[2]  # 22 records: the held-out eval part (index % 25 == 24) is empty


def test_array_record_records(tmp_path):
  rng = np.random.default_rng(6)
  recs = [good_record(rng) for _ in range(6)]
  raw = [json.dumps(r, ensure_ascii=False).encode() for r in recs]
  raw[2] = json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"content": "b"}]}).encode()
  raw[4] = b"\xff\xfe not json"
  w = array_record_module.ArrayRecordWriter(str(tmp_path / "sft.array_record"), "group_size:1")
  for r in raw:
    w.write(r)
  w.close()
  src = chat_records.MessageRecordSource(str(tmp_path / "*.array_record"), "array_record")
  assert len(src) == 6
  for i in (0, 1, 3, 5):
    assert src[i] == recs[i]
  with pytest.raises(sources.BadRecordError, match=r"sft\.array_record record 2: messages\[1\]\.role: '<missing>'"):
    src[2]
  with pytest.raises(sources.BadRecordError, match=r"sft\.array_record record 4: not valid UTF-8"):
    src[4]


def test_tfds_records_through_data_source(monkeypatch):
  rng = np.random.default_rng(7)
  recs = [good_record(rng) for _ in range(3)]
  items = [{"messages": np.bytes_(json.dumps(r["messages"], ensure_ascii=False).encode()),
            "bucket": r["bucket"].encode()} for r in recs] + [{"messages": b'[{"role": "user", "content": "x"}]'}]
  calls = []

  def data_source(name, split, data_dir):
    calls.append((name, split, data_dir))
    return items

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source))
  src = chat_records.open_message_source("tfds", "sft:1.0.0|train|dev", split="eval", tfds_data_dir="/d")
  assert calls == [("sft:1.0.0", "dev", "/d")] and len(src) == 4
  for i, r in enumerate(recs):
    assert src[i] == {"messages": r["messages"], "bucket": r["bucket"]}
  with pytest.raises(sources.BadRecordError, match=r"tfds:sft:1\.0\.0\[dev\] record 3: messages: a conversation"):
    src[3]
