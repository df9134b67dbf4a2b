"""Grain input pipeline: document sources -> tokenizer -> packed rows -> phased mixture of batches.

    it = make_train_iterator(config)        # endless, checkpointable (get_state / set_state)
    batch = next(it)                        # numpy dict of this process's rows, see BATCH_KEYS
    ev = make_eval_iterator(config)         # config.eval_batches held-out batches, same every call

Modules: `sources` (files / embedded corpus -> documents), `tokenizers` (bytes, SentencePiece, HF),
`packing` (rows, batch dict), `pipeline` (split, shard, shuffle, mix, iterators).
"""

from turbos_jax.data.packing import BATCH_KEYS, PackIterator, rows_to_batch, segment_positions
from turbos_jax.data.pipeline import (
    MixtureIterator,
    make_eval_iterator,
    make_train_iterator,
    parse_mixture,
    split_documents,
)
from turbos_jax.data.sources import DataError, load_source
from turbos_jax.data.tokenizers import ByteTokenizer, check_vocab, load_tokenizer

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "DataError",
    "MixtureIterator",
    "PackIterator",
    "check_vocab",
    "load_source",
    "load_tokenizer",
    "make_eval_iterator",
    "make_train_iterator",
    "parse_mixture",
    "rows_to_batch",
    "segment_positions",
    "split_documents",
]
