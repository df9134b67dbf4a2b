"""Document sources: random-access lists of strings read from files, or the embedded corpus.

`load_source(name, spec, text_key)` turns one `config.data.sources` entry into a source with
`len(source)` and `source[i] -> str` (a grain `RandomAccessDataSource`), so the pipeline can
shuffle, split and shard documents by index. `spec` is a path or glob (matches sorted, so the order
is deterministic), or exactly "embedded". The format follows each file's extension:

  .txt           UTF-8 text; documents are separated by one or more blank lines (a paragraph block
                 is a document). Read whole at start-up. Long-form text whose paragraphs belong
                 together should go in JSONL instead.
  .jsonl         one JSON object per line, text in field `text_key`; blank lines skipped. Lines are
                 indexed at start-up and parsed when read, so a bad line is reported (file:line)
                 when the pipeline first reaches it, not by a full scan on every host.
  .array_record  records are JSON objects with field `text_key`, or raw UTF-8 text; the first
                 record decides which for the whole file.
  .parquet       column `text_key` (needs pyarrow); read one row group at a time.

"embedded" is the English prose every CPython install ships for `help()`:
`pydoc_data.topics.topics`, one document per topic, in sorted-key order (~80 topics, ~450 KB on
Python 3.11; the exact text varies slightly between Python versions). It needs no download, so the
quickstart trains on real text.

Every problem is a one-line `DataError` naming the culprit: a pattern matching no files, an empty
file, an unknown extension, bad UTF-8 (file), a bad JSON line (file:line), a missing text field.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import re

import numpy as np

EXTENSIONS = (".txt", ".jsonl", ".array_record", ".parquet")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


class DataError(ValueError):
    """A data source, tokenizer or pipeline setting is unusable; the message names the culprit."""


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 text (byte {e.start})") from None


class EmbeddedSource:
    """The `help()` topics shipped with CPython (`pydoc_data.topics`), one document per topic."""

    def __init__(self):
        from pydoc_data.topics import topics

        self._docs = [topics[k] for k in sorted(topics)]

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> str:
        return self._docs[i]

    def __repr__(self) -> str:
        return "EmbeddedSource(pydoc_data.topics)"


class TextFile:
    """A .txt file: documents are blank-line-separated blocks (read whole at construction)."""

    def __init__(self, path: str, where: str):
        with open(path, "rb") as f:
            text = _decode(f.read(), f"{where}: {path}")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        self._docs = [b.strip("\n") for b in _BLANK_LINES.split(text) if b.strip()]
        self.path = path

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> str:
        return self._docs[i]


class JsonlFile:
    """A .jsonl file: line offsets indexed at construction; each line parsed when read."""

    def __init__(self, path: str, text_key: str, where: str):
        self.path, self.text_key, self._where = path, text_key, where
        ends, size, last = [], 0, b"\n"
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):  # newline scan in 16 MiB chunks
                ends.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
                size, last = size + len(chunk), chunk[-1:]
            ends = np.concatenate([*ends, [size] if last != b"\n" else []]).astype(np.int64)
            starts = np.concatenate([[0], ends[:-1] + 1])[: len(ends)].astype(np.int64)
            keep = ends - starts > 0
            for j in np.flatnonzero(keep & (ends - starts < 8)):  # short lines: whitespace only?
                f.seek(starts[j])
                keep[j] = bool(f.read(ends[j] - starts[j]).strip())
        self._starts, self._ends = starts[keep], ends[keep]
        self._lines = np.flatnonzero(keep) + 1  # 1-based line numbers for error messages
        self._file = None

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> str:
        if self._file is None:
            self._file = open(self.path, "rb")  # kept open for random access
        start, end = int(self._starts[i]), int(self._ends[i])
        self._file.seek(start)
        where = f"{self._where}: {self.path}:{self._lines[i]}"
        line = _decode(self._file.read(end - start), where)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
            raise DataError(f"{where}: not a JSON object with a string field {self.text_key!r}")
        return record[self.text_key]

    def __getstate__(self):
        return {**self.__dict__, "_file": None}


class ArrayRecordFile:
    """An .array_record file of JSON objects (field `text_key`) or of raw UTF-8 text records."""

    def __init__(self, path: str, text_key: str, where: str):
        from grain.sources import ArrayRecordDataSource

        self.path, self.text_key, self._where = path, text_key, where
        self._records = ArrayRecordDataSource([path])
        self._json = False
        if len(self._records):
            try:
                self._json = isinstance(json.loads(self._records[0]), dict)
            except (ValueError, UnicodeDecodeError):
                pass

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> str:
        where = f"{self._where}: {self.path}: record {i}"
        text = _decode(self._records[i], where)
        if not self._json:
            return text
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: not valid JSON ({e.msg}); the file's first record is JSON, so every record must be"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
            raise DataError(f"{where}: not a JSON object with a string field {self.text_key!r}")
        return record[self.text_key]


class ParquetFile:
    """A .parquet file, column `text_key`; rows read one row group at a time (last one cached)."""

    def __init__(self, path: str, text_key: str, where: str):
        self.path, self.text_key, self._where = path, text_key, where
        meta = _pyarrow_parquet(where).ParquetFile(path).metadata
        if text_key not in meta.schema.names:
            raise DataError(
                f"{where}: {path}: no column {text_key!r} (columns: {', '.join(meta.schema.names)})"
            )
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        self._file, self._group, self._texts = None, -1, []

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> str:
        group = bisect.bisect_right(self._offsets, i) - 1
        if group != self._group:
            if self._file is None:
                self._file = _pyarrow_parquet(self._where).ParquetFile(self.path)
            table = self._file.read_row_group(group, columns=[self.text_key])
            self._texts, self._group = table.column(0).to_pylist(), group
        text = self._texts[i - int(self._offsets[group])]
        if not isinstance(text, str):
            raise DataError(
                f"{self._where}: {self.path}: row {i}: column {self.text_key!r} "
                f"holds {type(text).__name__}, not a string"
            )
        return text

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_group": -1, "_texts": []}


def _pyarrow_parquet(where: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{where}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    return pq


class ConcatSource:
    """Several file sources read as one list of documents, in the given (sorted) file order."""

    def __init__(self, parts: list):
        self.parts = parts
        self._offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        part = bisect.bisect_right(self._offsets, i) - 1
        return self.parts[part][i - int(self._offsets[part])]

    def __repr__(self) -> str:
        return f"ConcatSource({len(self.parts)} files, {len(self)} documents)"


def open_file(path: str, text_key: str, where: str):
    """One file as a document source, by extension; raises DataError if it holds no documents."""
    ext = next((e for e in EXTENSIONS if path.endswith(e)), None)
    if ext is None:
        raise DataError(f"{where}: {path}: unknown file type (expected {', '.join(EXTENSIONS)})")
    if ext == ".txt":
        source = TextFile(path, where)
    elif ext == ".jsonl":
        source = JsonlFile(path, text_key, where)
    elif ext == ".array_record":
        source = ArrayRecordFile(path, text_key, where)
    else:
        source = ParquetFile(path, text_key, where)
    if len(source) == 0:
        raise DataError(f"{where}: {path}: no documents (empty file)")
    return source


def load_source(name: str, spec: str, text_key: str):
    """`config.data.sources[name] = spec` as a random-access source of document strings."""
    where = f"config.data.sources.{name}"
    if spec == "embedded":
        return EmbeddedSource()
    pattern = os.path.expanduser(str(spec))
    paths = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern, recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise DataError(f"{where}: no files match {spec!r}")
    return ConcatSource([open_file(p, text_key, where) for p in paths])
