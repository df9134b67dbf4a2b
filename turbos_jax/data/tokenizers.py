"""Tokenizers: `config.data.tokenizer` is "bytes", a SentencePiece `.model` or a tokenizer.json.

Each exposes `name` (the config value), `vocab_size`, `eos_id` (int or None), `encode(str) ->
list[int]` and `decode(ids) -> str`. `encode` never adds special tokens; the pipeline appends
`eos_id` to every document when the tokenizer has one (so the model learns to end documents), and
relies on `segment_ids` / `loss_mask` to separate documents in any case.

ByteTokenizer (the default): ids are the UTF-8 bytes, vocab 256, no special tokens at all (no BOS,
no EOS: every id is a byte, which the tiny model's vocab_size 256 requires); documents are
delimited by segment ids alone. `decode` replaces bytes that do not form UTF-8 (a document cut
mid-character).

The SentencePiece and Hugging Face loaders import `sentencepiece` / `tokenizers` lazily, so neither
package is needed unless such a tokenizer is configured. Loaded tokenizers pickle by path (reloaded
on unpickle) for grain worker processes.
"""

from __future__ import annotations

import os

from turbos_jax.data.sources import DataError

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
    """A Hugging Face `tokenizer.json` (needs the `tokenizers` package)."""

    def __init__(self, path: str):
        self.name = self.path = path
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
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def load_tokenizer(spec: str):
    """`config.data.tokenizer`: "bytes", or a SentencePiece `.model` / tokenizer.json path."""
    if spec == "bytes":
        return ByteTokenizer()
    path = os.path.expanduser(str(spec))
    if not os.path.isfile(path):
        raise DataError(
            f'config.data.tokenizer={spec!r}: no such file (expected "bytes", a '
            "SentencePiece .model or a HF tokenizer.json)"
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
