"""Tokenizers: `config.data.tokenizer` is "bytes", "embedded_bpe", a SentencePiece `.model` or a
tokenizer.json.

Each exposes `name` (the config value), `vocab_size`, `eos_id` (int or None), `encode(str) ->
list[int]` and `decode(ids) -> str`. `encode` never adds special tokens; the pipeline appends
`eos_id` to every document when the tokenizer has one (so the model learns to end documents), and
relies on `segment_ids` / `loss_mask` to separate documents in any case.

ByteTokenizer (the default): ids are the UTF-8 bytes, vocab 256, no special tokens at all (no BOS,
no EOS: every id is a byte, which the tiny model's vocab_size 256 requires); documents are
delimited by segment ids alone. `decode` replaces bytes that do not form UTF-8 (a document cut
mid-character).

"embedded_bpe" (configs/small.py): a byte-level BPE of 8,192 ids ("<|endoftext|>" = id 0, its EOS;
the 256 byte symbols; 7,935 merged subwords) trained with HF `tokenizers` on the embedded corpus
(`pydoc_data.topics`, ~465 KB; ~4.5 bytes per token). That corpus holds only ~9,200 distinct
merges, so 8,192 is about the largest vocabulary it fills. The file ships in the package
(`embedded_bpe.json`, written by `train_embedded_bpe().save(EMBEDDED_BPE_PATH, pretty=False)` in
0.3 s on Python 3.11) rather than being trained on first use: the corpus text changes between
Python versions, and a checkpoint must keep its tokenizer.

The SentencePiece and Hugging Face loaders import `sentencepiece` / `tokenizers` lazily, so neither
package is needed unless such a tokenizer is configured. Loaded tokenizers pickle by path (reloaded
on unpickle) for grain worker processes.
"""

from __future__ import annotations

import os

from turbos_jax.data.sources import DataError

EMBEDDED_BPE = "embedded_bpe"
EMBEDDED_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_bpe.json")
EMBEDDED_BPE_VOCAB = 8192
# Token strings tried, in order, as the EOS of a HF tokenizer.json (the format has no EOS field).
HF_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


class ByteTokenizer:
    """UTF-8 bytes as token ids: vocab 256, no special tokens."""

    name = "bytes"
    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece `.model` file (needs the `sentencepiece` package)."""

    def __init__(self, path: str):
        self.name = self.path = path
        try:
            import sentencepiece
        except ImportError:
            raise DataError(
                f"config.data.tokenizer={path!r}: a SentencePiece model needs the "
                "sentencepiece package (pip install sentencepiece)"
            ) from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"config.data.tokenizer={path!r}: not a SentencePiece model ({first})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        self.eos_id = eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (needs the `tokenizers` package); `name` defaults to the path."""

    def __init__(self, path: str, name: str | None = None):
        self.path = path
        self.name = path if name is None else name
        try:
            import tokenizers
        except ImportError:
            raise DataError(
                f"config.data.tokenizer={path!r}: a tokenizer.json needs the "
                "tokenizers package (pip install tokenizers)"
            ) from None
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a plain Exception
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"config.data.tokenizer={path!r}: not a HF tokenizer.json ({first})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        ids = (self._tok.token_to_id(t) for t in HF_EOS_TOKENS)
        self.eos_id = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __getstate__(self):
        return {"path": self.path, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["path"], state["name"])


def train_embedded_bpe(vocab_size: int = EMBEDDED_BPE_VOCAB):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the embedded corpus (deterministic).

    1. Pre-tokenize GPT-2 style (ByteLevel: UTF-8 bytes mapped to 256 printable symbols, split at
       word/space/punctuation boundaries), so any text encodes and decodes losslessly.
    2. Start from all 256 byte symbols plus "<|endoftext|>" and merge the most frequent adjacent
       pair until `vocab_size` ids exist (or the corpus has no pair left)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from turbos_jax.data.sources import EmbeddedSource

    source = EmbeddedSource()
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator((source[i] for i in range(len(source))), trainer, length=len(source))
    return tok


def load_tokenizer(spec: str):
    """`config.data.tokenizer`: "bytes", "embedded_bpe", or a SentencePiece `.model` / tokenizer.json
    path."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == EMBEDDED_BPE:
        return HFTokenizer(EMBEDDED_BPE_PATH, name=EMBEDDED_BPE)
    path = os.path.expanduser(str(spec))
    if not os.path.isfile(path):
        raise DataError(
            f'config.data.tokenizer={spec!r}: no such file (expected "bytes", "{EMBEDDED_BPE}", '
            "a SentencePiece .model or a HF tokenizer.json)"
        )
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HFTokenizer(path)
    raise DataError(
        f"config.data.tokenizer={spec!r}: unknown tokenizer file type (expected a "
        "SentencePiece .model or a HF tokenizer.json)"
    )


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Raises DataError unless every id of `tokenizer` is a valid row of the model's embedding."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"config.data.tokenizer={tokenizer.name!r} has {tokenizer.vocab_size} "
            f"token ids but config.model.vocab_size={model_vocab_size}: the model "
            "vocabulary must be at least as large"
        )
