"""Packing: a stream of tokenised documents -> rows of `seq_len + 1` tokens -> training batches.

Concatenate-then-split, no padding while documents keep coming: each row is filled with whole
documents and pieces of documents, numbered 1, 2, ... within the row (`segment_ids`). A document
that does not fit continues at the start of the next row, where it is segment 1 again and its
positions restart at 0 (attention is relative (RoPE) and never crosses rows, so only the in-row
context is lost). Only the last row of a finite stream is padded (segment 0). Every token of the
stream lands in exactly one row.

A row of `seq_len + 1` tokens gives inputs = row[:-1] and targets = row[1:]; `loss_mask` is 1 where
the target is the next token of the same document (no loss across a document boundary, into padding
or on padding). The last token of a row is a target only, so a document cut between rows loses one
next-token prediction at the cut.

Batch dict (numpy, B rows, L = seq_len):
  inputs, targets, segment_ids, positions  (B, L) int32
  loss_mask                                (B, L) float32 (1.0 / 0.0)
`positions` equal `turbos_jax.model.segment_positions(segment_ids)`.

The packing iterator's state is the state of its document stream *before* the document it is in the
middle of, plus the number of that document's tokens already emitted: restoring re-reads one
document and skips the emitted part, so states stay small however long documents are.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from turbos_jax.data.sources import DataError
from turbos_jax.data.tokenizers import ByteTokenizer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class Tokenize:
    """str -> int32 token array with the tokenizer's EOS appended (if it has one). Picklable."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> np.ndarray:
        if isinstance(self.tokenizer, ByteTokenizer):
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        ids = self.tokenizer.encode(text)
        if self.tokenizer.eos_id is not None:
            ids = [*ids, self.tokenizer.eos_id]
        return np.asarray(ids, np.int32)


class PackIterator(grain.DatasetIterator):
    """Packs token arrays from `parent` into {"tokens", "segment_ids"} rows of `row_len`."""

    def __init__(
        self, parent: grain.DatasetIterator, row_len: int, *, max_empty: int | None = None, name: str = "?"
    ):
        super().__init__(parent)
        self._row_len, self._max_empty, self._name = row_len, max_empty, name
        self._empty = 0  # consecutive empty documents (an all-empty endless stream never packs)
        self._doc: np.ndarray | None = None  # document being emitted
        self._doc_state = None  # parent state before `_doc` was read
        self._offset = 0  # tokens of `_doc` already emitted (or to skip, while `_doc` is None)

    def _next_doc(self) -> bool:
        self._doc_state = self._parent.get_state()
        try:
            doc = next(self._parent)
        except StopIteration:
            return False
        self._doc = np.asarray(doc, np.int32).reshape(-1)
        self._offset = min(self._offset, len(self._doc))  # skip count restored by set_state
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        tokens = np.zeros(self._row_len, np.int32)
        segs = np.zeros(self._row_len, np.int32)
        n = seg = 0
        while n < self._row_len:
            if self._doc is None or self._offset == len(self._doc):
                if self._doc is not None:
                    self._doc, self._offset = None, 0
                if not self._next_doc():
                    break
                if self._offset == len(self._doc):  # empty document
                    self._empty += len(self._doc) == 0
                    if self._max_empty is not None and self._empty > self._max_empty:
                        raise DataError(
                            f"config.data.sources.{self._name}: every document tokenises to zero tokens"
                        )
                    continue
                self._empty = 0
            take = min(self._row_len - n, len(self._doc) - self._offset)
            seg += 1
            tokens[n : n + take] = self._doc[self._offset : self._offset + take]
            segs[n : n + take] = seg
            n += take
            self._offset += take
        if n == 0:
            raise StopIteration
        return {"tokens": tokens, "segment_ids": segs}

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": self._offset}
        return {"parent": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._doc_state, self._offset = None, None, int(state["offset"])


class PackIterDataset(grain.IterDataset):
    """`parent` (token arrays) packed into rows of `row_len` tokens (see PackIterator)."""

    def __init__(self, parent: grain.IterDataset, row_len: int):
        super().__init__(parent)
        self._row_len = row_len

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self._row_len)

    def __str__(self) -> str:
        return f"PackIterDataset(row_len={self._row_len})"


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """(B, L) positions restarting at 0 wherever the segment id changes (as the model computes)."""
    b, l = segment_ids.shape
    idx = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l))
    starts = np.concatenate([np.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)).astype(np.int32)


def rows_to_batch(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Packed rows of L + 1 tokens -> the (B, L) batch dict (see the module docstring)."""
    tokens = np.stack([r["tokens"] for r in rows])
    segs = np.stack([r["segment_ids"] for r in rows])
    seg_in = segs[:, :-1]
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": seg_in,
        "positions": segment_positions(seg_in),
        "loss_mask": ((seg_in == segs[:, 1:]) & (seg_in != 0)).astype(np.float32),
    }
