"""Chat turns -> text with a checkpoint's Jinja chat template -> token ids + the assistant-token mask SFT trains on.

The template comes from `chat_template.jinja` or `tokenizer_config.json` ('chat_template': a string or a list of
named templates) and renders in the sandboxed Jinja environment transformers uses (trim_blocks, lstrip_blocks,
loop controls, `tojson`, `raise_exception`, `strftime_now`), with the special tokens of tokenizer_config.json.
Assistant spans come from the template's `{% generation %}...{% endgeneration %}` blocks when it has them;
otherwise each assistant turn is the text that rendering through that turn adds to rendering the turns before it
with the generation prompt (checked to be a prefix, else a ChatTemplateError).

    chat = ChatTokenizer.from_pretrained("/ckpt/kanana-2-30b-a3b-instruct")
    enc = chat.encode(messages, tools=tools)   # enc.ids int32[N], enc.assistant_mask bool[N]
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from contextvars import ContextVar

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template is missing, fails to render, or cannot delimit assistant turns."""


class _GenerationSpans(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body and records its character span in the output."""
    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self.state = ContextVar("generation_spans", default=None)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller):
        text = caller()
        state = self.state.get()
        if state is not None:
            chunks, spans = state
            start = sum(len(c) for c in chunks)
            spans.append((start, start + len(text)))
        return text


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in a sandbox with transformers' options, filters and globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationSpans, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from e


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def _normalize(messages) -> list[dict]:
    """Plain dict copies with None-valued keys dropped and reasoning aliased under its usual names."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with a 'role', got {m!r}")
        m = {k: v for k, v in json.loads(json.dumps(m)).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


@dataclasses.dataclass(frozen=True)
class ChatEncoding:
    """Rendered chat: text, token ids int32[N], assistant_mask bool[N], char offsets int[N,2]."""
    text: str
    ids: np.ndarray
    assistant_mask: np.ndarray
    offsets: np.ndarray
    spans: tuple


class ChatTokenizer:
    """A `tokenizers` tokenizer plus a Jinja chat template and the special tokens the template may reference."""

    def __init__(self, tokenizer, template: str, special_tokens: dict | None = None):
        self.tokenizer = tokenizer
        self.source = template
        self.template = compile_template(template)
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.has_generation_tags = bool(_GENERATION_TAG.search(template))

    @classmethod
    def from_pretrained(cls, directory: str, template_name: str | None = None):
        """Loads tokenizer.json, tokenizer_config.json (special tokens, chat_template) and chat_template.jinja."""
        import tokenizers  # pylint: disable=import-outside-toplevel
        tok_file = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{tok_file} does not exist: expected a HuggingFace checkpoint directory")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"cannot load {tok_file}: {e}") from e
        config = {}
        config_file = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        jinja_file = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):
            named = {t["name"]: t["template"] for t in template}
            key = template_name or "default"
            if key not in named:
                raise ChatTemplateError(f"{config_file} has chat templates {sorted(named)}; pass template_name")
            template = named[key]
        if not template:
            raise ChatTemplateError(f"{directory} has no chat template (tokenizer_config.json 'chat_template' or "
                                    "chat_template.jinja)")
        special = {k: _token_text(config[k]) for k in SPECIAL_TOKEN_KEYS if k in config}
        return cls(tokenizer, template, special)

    def _render(self, messages, tools, add_generation_prompt, kwargs, spans=None) -> str:
        context = {**self.special_tokens, **kwargs, "messages": _normalize(messages),
                   "tools": json.loads(json.dumps(tools)) if tools is not None else None,
                   "add_generation_prompt": add_generation_prompt}
        context.setdefault("documents", None)
        ext = self.template.environment.extensions[_GenerationSpans.identifier]
        chunks = []
        token = ext.state.set((chunks, spans if spans is not None else []))
        try:
            for chunk in self.template.generate(**context):
                chunks.append(chunk)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from e
        finally:
            ext.state.reset(token)
        return "".join(chunks)

    def render(self, messages, tools=None, add_generation_prompt: bool = False, **kwargs) -> str:
        """The chat as text (special tokens included as text, as the template writes them)."""
        return self._render(messages, tools, add_generation_prompt, kwargs)

    def assistant_spans(self, messages, tools=None, add_generation_prompt: bool = False, **kwargs):
        """(text, [(start, end) character spans of assistant output])."""
        spans = []
        text = self._render(messages, tools, add_generation_prompt, kwargs, spans)
        if self.has_generation_tags:
            return text, spans
        spans, previous_end = [], 0
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self._render(messages[:i], tools, True, kwargs)
            through = self._render(messages[:i + 1], tools, False, kwargs)
            if not (through.startswith(before) and text.startswith(through) and len(before) >= previous_end):
                raise ChatTemplateError(
                    f"cannot delimit assistant message {i}: rendering the chat up to it is not a prefix of the "
                    "full rendering (the template rewrites earlier turns); add {% generation %}...{% endgeneration %} "
                    "around the assistant output in the template")
            spans.append((len(before), len(through)))
            previous_end = len(through)
        return text, spans

    def encode(self, messages, tools=None, add_generation_prompt: bool = False, **kwargs) -> ChatEncoding:
        """Token ids of the rendered chat (no special tokens added beyond the template's) and the mask of tokens
        that overlap an assistant span."""
        text, spans = self.assistant_spans(messages, tools, add_generation_prompt, **kwargs)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        mask = np.zeros(len(enc.ids), bool)
        for start, end in spans:
            mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
        return ChatEncoding(text, np.asarray(enc.ids, np.int32), mask, offsets, tuple(spans))
