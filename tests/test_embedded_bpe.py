"""configs/small.py's tokenizer, "embedded_bpe": a byte-level BPE shipped in the package whose ids
fill the small model's vocabulary, and which the training pipeline feeds (EOS between documents)."""

import numpy as np

from configs import small
from turbos_jax.data import load_tokenizer, make_train_iterator
from turbos_jax.data.sources import EmbeddedSource
from turbos_jax.data.tokenizers import EMBEDDED_BPE_VOCAB, HFTokenizer, train_embedded_bpe


def _corpus_ids(tok) -> list[int]:
    source = EmbeddedSource()
    return [i for k in range(len(source)) for i in tok.encode(source[k])]


def test_small_config_uses_every_embedding_row_and_subwords():
    config = small.get_config()
    tok = load_tokenizer(config.data.tokenizer)
    assert tok.vocab_size == config.model.vocab_size == EMBEDDED_BPE_VOCAB
    assert tok.eos_id == 0 and tok.name == "embedded_bpe"
    ids = _corpus_ids(tok)
    corpus_bytes = sum(len(EmbeddedSource()[k].encode()) for k in range(len(EmbeddedSource())))
    assert corpus_bytes / len(ids) > 4.0  # subwords: ~4.5 bytes per token
    # Most rows are real tokens of the training text (merges later absorbed into longer ones are
    # the rest); the byte tokenizer, the control, would use at most 256 / 8192 of them.
    assert len(set(ids)) > 0.7 * config.model.vocab_size, len(set(ids))
    assert len(set(_corpus_ids(load_tokenizer("bytes")))) <= 256


def test_round_trip_of_any_text():
    tok = load_tokenizer("embedded_bpe")
    text = "def f(x):\n    return x ** 2  # héllo wörld, 你好, \x00\t emoji \U0001f600\n\n"
    ids = tok.encode(text)
    assert max(ids) < tok.vocab_size and tok.eos_id not in ids
    assert tok.decode(ids) == text


def test_shipped_file_is_what_training_makes(tmp_path):
    """Training on this Python's corpus gives a tokenizer of the same size, a byte-level BPE like the
    shipped one (the corpus text varies a little between Python versions, so ids may differ)."""
    path = str(tmp_path / "bpe.json")
    train_embedded_bpe().save(path, pretty=False)
    fresh, shipped = HFTokenizer(path), load_tokenizer("embedded_bpe")
    assert fresh.vocab_size == shipped.vocab_size == EMBEDDED_BPE_VOCAB
    text = EmbeddedSource()[0][:2000]
    assert fresh.decode(fresh.encode(text)) == text
    shared = set(fresh._tok.get_vocab()) & set(shipped._tok.get_vocab())
    assert len(shared) > 0.9 * EMBEDDED_BPE_VOCAB


def test_pipeline_feeds_bpe_ids_with_eos_between_documents():
    config = small.get_config()
    config.batch_size = 8  # rows of 1024 tokens: several document ends among them
    batch = next(make_train_iterator(config, process_index=0, process_count=1))
    tokens = np.asarray(batch["inputs"])
    assert tokens.max() < config.model.vocab_size and tokens.max() > 255  # subword ids, not bytes
    segments = np.asarray(batch["segment_ids"])
    # Where a row moves to the next document, the previous document ended with EOS (id 0).
    ends = (segments[:, 1:] != segments[:, :-1]) & (segments[:, 1:] > 0)
    assert ends.any() and (tokens[:, :-1][ends] == 0).all()
