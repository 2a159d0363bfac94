"""The tokenizer files of a HuggingFace export, so that `AutoTokenizer.from_pretrained(OUT)` works as it is.

A run's `data.tokenizer` is either 'byte' (UTF-8 bytes 0..255, pad 256, bos 257, eos 258: `data/tokenizer.py`) or
a HuggingFace tokenizer.json. For 'byte' this writes an equivalent fast tokenizer (byte-level, no merges, the three
special tokens at the same ids, BOS prepended like the training documents and the eval prompts); for a
tokenizer.json it copies the file and the tokenizer_config / special-tokens / chat-template files beside it.
An export with `--base` takes the base checkpoint's files instead (hf_export.SIDE_FILES).
"""
from __future__ import annotations

import json
import os
import shutil

from kanana_jax.data.tokenizer import ByteTokenizer, make_tokenizer

BYTE_SPECIAL = {"<pad>": ByteTokenizer.pad_id, "<s>": ByteTokenizer.bos_id, "</s>": ByteTokenizer.eos_id}
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """A `tokenizers.Tokenizer` with ByteTokenizer's ids: byte b -> id b, <pad>/<s>/</s> -> 256/257/258."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIAL])
    assert all(tok.token_to_id(t) == i for t, i in BYTE_SPECIAL.items()), "special token ids moved"
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", ByteTokenizer.bos_id)])
    return tok


def write_tokenizer(out_dir: str, spec: str) -> tuple[list[str], dict]:
    """Writes the tokenizer of `data.tokenizer` = `spec` into `out_dir`; returns (file names, token ids for
    config.json: bos/eos/pad_token_id)."""
    tokenizer = make_tokenizer(spec)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if spec == "byte":
        byte_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": "<pad>", "add_bos_token": True, "clean_up_tokenization_spaces": False,
                  "model_max_length": 1 << 20}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        files = ["tokenizer.json", "tokenizer_config.json"]
    else:
        shutil.copyfile(spec, os.path.join(out_dir, "tokenizer.json"))
        files = ["tokenizer.json"]
        for side in SIDE_FILES:
            path = os.path.join(os.path.dirname(os.path.abspath(spec)), side)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(out_dir, side))
                files.append(side)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(ids, f, indent=2)
    return files + ["generation_config.json"], ids
