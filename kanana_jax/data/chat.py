"""Chat records -> token ids with a per-token loss mask (SFT), and prompt ids for the sampler that match eval.

`ChatRenderer.for_tokenizer(tokenizer)` picks one of two renderings, as evals/runner.chat_format does (which
reads tokenizer_config.json only; a template in chat_template.jinja is used here too):
- template: the HF chat template (`chat_template.jinja`, else `tokenizer_config.json` 'chat_template') beside
  an HF tokenizer.json, through `convert.tokenizer_chat.ChatTokenizer`. Trained tokens are the template's
  assistant spans, which must contain an end-of-turn stop token (EOS, <|eot_id|>, <|im_end|>...).
- plain: eval's `render_plain` text, BOS first: 'System: s\\n\\nUser: u\\n\\nAssistant: a ...'. Structured tool
  calls and tool results become Hermes blocks (`generate.tool_calls.to_text_messages`), tool specs go into
  the system prompt (as the eval tools suite writes them).

End of turn (plain): every assistant turn is trained to end with the tokenizer's EOS id, inserted after the
assistant text; the sampler stops on it (eval's `chat_format` stop_token_ids include eos_id). The text is
otherwise eval's: dropping the EOS ids from a training sequence leaves render_plain's text, so the first
assistant turn's context equals eval's prompt exactly; later turns see the EOS of earlier turns in their
history, which eval's plain prompts (no end-of-turn token in history) do not have.

Mask convention: `loss_mask_N[i] = 1` when ids_N[i] is a trained TARGET (an assistant token predicted from
ids_N[:i]): the assistant's text, its tool calls and its end-of-turn token; 0 on BOS, system, user and tool
turns and role headers. A next-token batch (inputs = ids[:-1], targets = ids[1:]) takes
`shifted_loss_mask(loss_mask_N)[:-1]`, i.e. position t is trained when ids[t + 1] is.
Too long for a row: `truncate_at_turn(tokens, max_len)` keeps whole assistant turns (a conversation is never
split across rows). Records to render come from `data.chat_records.MessageRecordSource`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from kanana_jax.convert import tokenizer_chat
from kanana_jax.data import tokenizer as tokenizer_lib
from kanana_jax.generate import tool_calls

ROLES = ("system", "user", "assistant", "tool")
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}  # = runner's
PLAIN_PROMPT = "\n\nAssistant:"  # what render_plain ends with: the generation prompt
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|endofturn|>")  # = runner's


@dataclasses.dataclass(frozen=True)
class ChatTokens:
  """A rendered conversation: ids_N int32, loss_mask_N float32 (1 where ids_N[i] is a trained target),
  turn_ends_M int32 (one past message m's last token) and roles_M (message m's role)."""
  ids_N: np.ndarray
  loss_mask_N: np.ndarray
  turn_ends_M: np.ndarray
  roles_M: tuple[str, ...]

  @property
  def assistant_ends(self) -> list[int]:
    """Token index one past each assistant turn's end-of-turn token (the cut points of truncate_at_turn)."""
    return [int(e) for e, r in zip(self.turn_ends_M, self.roles_M) if r == "assistant"]


def shifted_loss_mask(loss_mask_N: np.ndarray) -> np.ndarray:
  """Per-input-position mask [N]: [t] = loss_mask_N[t + 1] (the target ids[t + 1] is trained), last = 0."""
  mask = np.asarray(loss_mask_N, np.float32)
  return np.concatenate([mask[1:], np.zeros(1 if len(mask) else 0, np.float32)])


def truncate_at_turn(tokens: ChatTokens, max_len: int) -> ChatTokens | None:
  """The longest prefix of at most `max_len` ids that ends at an assistant turn's end, or None if even the
  first assistant turn does not fit. `max_len = len(ids_N)` drops trailing untrained turns."""
  fits = [m for m, (e, r) in enumerate(zip(tokens.turn_ends_M, tokens.roles_M)) if r == "assistant" and e <= max_len]
  if not fits:
    return None
  m, n = fits[-1], int(tokens.turn_ends_M[fits[-1]])
  return ChatTokens(tokens.ids_N[:n], tokens.loss_mask_N[:n], tokens.turn_ends_M[:m + 1], tokens.roles_M[:m + 1])


def _special_id(tokenizer, text: str) -> int | None:
  ids = tokenizer.encode(text)
  return ids[0] if len(ids) == 1 and tokenizer.decode(ids) == "" else None


def stop_token_ids(tokenizer) -> tuple[int, ...]:
  """EOS plus the end-of-turn special tokens the tokenizer has: eval's (and the sampler's) stop ids."""
  return tuple(sorted({tokenizer.eos_id} | {i for t in END_OF_TURN_TOKENS
                                            if (i := _special_id(tokenizer, t)) is not None}))


class ChatRenderer:
  """Messages -> ChatTokens for training, or -> prompt ids for generation; see the module docstring."""
  name: str
  tokenizer: Any
  stop_token_ids: tuple[int, ...]

  @staticmethod
  def for_tokenizer(tokenizer) -> "ChatRenderer":
    """The template renderer when an HF tokenizer.json has a chat template beside it, else the plain one."""
    if isinstance(tokenizer, tokenizer_lib.HFTokenizer):
      found = _template_beside(tokenizer.spec)
      if found is not None:
        return TemplateChatRenderer(tokenizer, *found)
    return PlainChatRenderer(tokenizer)

  def encode(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> ChatTokens:
    """The whole conversation with its loss mask (trailing non-assistant turns are rendered, untrained)."""
    raise NotImplementedError

  def render_for_generation(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
    """Prompt ids asking for the next assistant turn: equal to evals.runner.prompt_ids for these messages."""
    raise NotImplementedError


def _template_beside(spec: str) -> tuple[str, dict, str] | None:
  """(template, special tokens, where) from chat_template.jinja or tokenizer_config.json next to `spec`."""
  directory = os.path.dirname(os.path.abspath(spec))
  config_file, jinja_file = (os.path.join(directory, f) for f in ("tokenizer_config.json", "chat_template.jinja"))
  config = {}
  if os.path.isfile(config_file):
    with open(config_file, encoding="utf-8") as f:
      config = json.load(f)
  template, where = config.get("chat_template"), config_file
  if os.path.isfile(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      template, where = f.read(), jinja_file
  if isinstance(template, list):  # named templates: 'default', else the first (as eval picks)
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default") or next(iter(named.values()), None)
  if not template:
    return None
  special = {k: config[k].get("content") if isinstance(config[k], dict) else config[k]
             for k in tokenizer_chat.SPECIAL_TOKEN_KEYS if k in config}
  return template, special, f"template:{where}"


# ----------------------------------------------------------------------------- plain


def _plain_body(message: dict) -> str:
  """A message's text in the plain rendering: Hermes blocks for tool calls and results, stripped."""
  return tool_calls.to_text_messages([message])[0]["content"].strip()


class PlainChatRenderer(ChatRenderer):
  """Eval's plain 'Role: text' rendering with an EOS id ending each assistant turn."""

  def __init__(self, tokenizer):
    self.tokenizer, self.name = tokenizer, "plain"
    self.stop_token_ids = stop_token_ids(tokenizer)

  def _bodies(self, messages, tools) -> list[str]:
    bodies = [_plain_body(m) for m in messages]
    if tools and messages and messages[0]["role"] == "system":
      bodies[0] = tool_calls.render_tools_system_prompt(tools, bodies[0]).strip()
    return bodies

  def _preamble(self, messages, tools) -> str:
    """The system turn listing `tools` when the conversation has no system message of its own."""
    if tools and not (messages and messages[0]["role"] == "system"):
      return f"System: {tool_calls.render_tools_system_prompt(tools).strip()}"
    return ""

  def render_text(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> str:
    """Eval's render_plain of the text messages: 'Role: body' turns joined by blank lines + '\\n\\nAssistant:'."""
    preamble, previous = self._preamble(messages, tools), None
    parts = [preamble] if preamble else []
    for m, body in zip(messages, self._bodies(messages, tools)):
      if m["role"] == "tool" and previous == "tool":  # to_text_messages merges consecutive tool results
        parts[-1] += "\n" + body
      else:
        parts.append(f"{PLAIN_ROLES[m['role']]}: {body}")
      previous = m["role"]
    return "\n\n".join(parts) + PLAIN_PROMPT

  def render_for_generation(self, messages, tools=None) -> list[int]:
    return [self.tokenizer.bos_id] + list(self.tokenizer.encode(self.render_text(messages, tools)))

  def encode(self, messages, tools=None) -> ChatTokens:
    """Untrained text between assistant turns is tokenized as one string (the first one is exactly eval's
    prompt); each assistant body (' ' + text) is tokenized alone and followed by the EOS id."""
    tok = self.tokenizer
    ids, mask = [tok.bos_id], [0.0]
    ends = np.zeros(len(messages), np.int32)
    pending, marks = self._preamble(messages, tools), []  # untrained text not yet tokenized; (message, char end)

    def flush():
      nonlocal pending
      for m, at in marks:  # exact where the tokenizer does not merge across the boundary (always for bytes)
        ends[m] = len(ids) + len(tok.encode(pending[:at]))
      ids.extend(tok.encode(pending))
      mask.extend([0.0] * (len(ids) - len(mask)))
      pending = ""
      marks.clear()

    previous = None
    for m, (msg, body) in enumerate(zip(messages, self._bodies(messages, tools))):
      role = msg["role"]
      if role == "assistant":
        pending += PLAIN_PROMPT  # the first one is eval's quirk for an empty history, the others the separator
        flush()
        ids.extend(list(tok.encode(" " + body)) + [tok.eos_id])
        mask.extend([1.0] * (len(ids) - len(mask)))
        ends[m] = len(ids)
      else:
        sep = "" if not (pending or len(ids) > 1) else "\n\n"
        pending += "\n" + body if role == "tool" and previous == "tool" else f"{sep}{PLAIN_ROLES[role]}: {body}"
        marks.append((m, len(pending)))
      previous = role
    flush()
    return ChatTokens(np.asarray(ids, np.int32), np.asarray(mask, np.float32), ends,
                      tuple(m["role"] for m in messages))


# ----------------------------------------------------------------------------- HF chat template


class TemplateChatRenderer(ChatRenderer):
  """The checkpoint's HF chat template; trained tokens are ChatTokenizer's assistant mask."""

  def __init__(self, tokenizer, template: str, special_tokens: dict, name: str):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.tokenizer, self.name = tokenizer, name
    self.chat = tokenizer_chat.ChatTokenizer(tokenizers.Tokenizer.from_file(tokenizer.spec), template, special_tokens)
    self.stop_token_ids = stop_token_ids(tokenizer)

  @staticmethod
  def template_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages as templates expect them: tool calls {'name', 'arguments'} in OpenAI 'function' form."""
    out = []
    for m in messages:
      if m.get("tool_calls"):
        calls = [c if "function" in c else {"type": "function", "function": {"name": c["name"],
                                                                              "arguments": c.get("arguments", {})}}
                 for c in m["tool_calls"]]
        m = {**m, "tool_calls": calls}
      out.append(m)
    return out

  def render_for_generation(self, messages, tools=None) -> list[int]:
    text = self.chat.render(self.template_messages(messages), tools, add_generation_prompt=True)
    return list(self.tokenizer.encode(text))

  def encode(self, messages, tools=None) -> ChatTokens:
    """Other messages end where rendering the chat through them ends (mapped to the covering token)."""
    msgs = self.template_messages(messages)
    enc = self.chat.encode(msgs, tools=tools)
    starts = enc.offsets[:, 0]
    n_assistant = sum(m["role"] == "assistant" for m in msgs)
    if len(enc.spans) != n_assistant:
      raise tokenizer_chat.ChatTemplateError(
          f"{self.name} marks {len(enc.spans)} assistant spans for {n_assistant} assistant messages")
    ends, spans, previous = np.zeros(len(msgs), np.int32), iter(enc.spans), 0
    for m, msg in enumerate(msgs):
      if msg["role"] == "assistant":
        lo, hi = next(spans)
        end = int(np.sum(starts < hi))
        if not np.isin(enc.ids[int(np.sum(starts < lo)):end], self.stop_token_ids).any():
          raise tokenizer_chat.ChatTemplateError(
              f"{self.name}: assistant message {m} renders without an end-of-turn token "
              f"(one of ids {self.stop_token_ids}) inside its trained span, so a trained model would not "
              "stop; put the end-of-turn token inside {% generation %}...{% endgeneration %}")
      else:
        through = self.chat.render(msgs[:m + 1], tools)
        end = int(np.sum(starts < len(through))) if enc.text.startswith(through) else previous
      ends[m] = previous = max(end, previous)
    return ChatTokens(enc.ids.astype(np.int32), enc.assistant_mask.astype(np.float32), ends,
                      tuple(m["role"] for m in msgs))
