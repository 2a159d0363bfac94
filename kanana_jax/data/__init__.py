"""Data: embedded corpus, tokenizers, document sources and the packed, resumable batch iterator."""
from kanana_jax.data.pipeline import TokenBatchIterator, chunk_bounds, make_eval_iterators, make_iterator
from kanana_jax.data.sources import (ArrayRecordSource, BadRecordError, EmbeddedSource, HeldOutView,
                                     JsonlSource, TfdsSource, embedded_domains, open_source)
from kanana_jax.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = [
    "ArrayRecordSource", "BadRecordError", "ByteTokenizer", "EmbeddedSource", "HFTokenizer",
    "HeldOutView", "JsonlSource", "TfdsSource", "TokenBatchIterator", "chunk_bounds", "make_eval_iterators",
    "embedded_domains", "make_iterator", "make_tokenizer", "open_source",
]
