"""Input pipeline (turbos_jax/data): sources, tokenizers, packing, splits, shards, mixtures, resume.

Corpora are random documents with a unique ASCII header "<NNNNN>|" each, so any stream of packed
rows can be parsed back into the documents it holds: that checks no token is lost or duplicated,
which documents a split or a process saw, and the exact segment ids / positions / loss mask of every
row.
"""

import json
import random

import grain
import numpy as np
import pytest

from configs import tiny
from turbos_jax.data import (
    BATCH_KEYS,
    ByteTokenizer,
    DataError,
    PackIterator,
    check_vocab,
    load_source,
    load_tokenizer,
    make_eval_iterator,
    make_train_iterator,
    rows_to_batch,
    split_documents,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyz     ,.\néüß"


def random_docs(n, seed, *, alphabet=ALPHABET, lo=3, hi=150):
    rng = random.Random(seed)
    return [
        f"<{i:05d}>|" + "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for i in range(n)
    ]


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def make_config(sources, mixture=None, *, batch_size=4, seq_len=32, eval_fraction=0.1, seed=0):
    c = tiny.get_config()
    c.seed, c.batch_size, c.seq_len, c.eval_batches = seed, batch_size, seq_len, 3
    c.data.sources = sources
    c.data.mixture = mixture or ((0, {n: 1.0 for n in sources}),)
    c.data.eval_fraction = eval_fraction
    c.data.worker_count = 0
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert sorted(x) == sorted(BATCH_KEYS)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def parse_stream(batches, docs_by_id):
    """Rows -> (ids of the documents in stream order, per-token document index). Checks every row's
    segment_ids, positions and loss_mask against the parsed document boundaries."""
    rows = [
        (b["inputs"][r], b["targets"][r], b["segment_ids"][r], b["positions"][r], b["loss_mask"][r])
        for b in batches
        for r in range(len(b["inputs"]))
    ]
    stream = np.concatenate([np.append(x, t[-1]) for x, t, *_ in rows]).astype(np.uint8).tobytes()
    ids, owner, i = [], np.full(len(stream), -1), 0
    while i < len(stream):
        head = stream[i : i + 8]
        if len(head) < 8:
            break
        doc_id = int(head[1:6])
        doc = docs_by_id[doc_id].encode()
        assert stream[i : i + len(doc)] == doc[: len(stream) - i], f"document {doc_id} corrupted"
        owner[i : i + len(doc)], i = len(ids), i + len(doc)
        ids.append(doc_id)
    start = 0
    for x, _, seg, pos, mask in rows:  # every row holds len(x) + 1 tokens of the stream
        o = owner[start : start + len(x) + 1]
        if (o < 0).any():
            break
        new = np.concatenate([[True], o[1:-1] != o[:-2]])
        np.testing.assert_array_equal(seg, np.cumsum(new))
        np.testing.assert_array_equal(mask, (o[:-1] == o[1:]).astype(np.float32))
        first = np.maximum.accumulate(np.where(new, np.arange(len(x)), 0))
        np.testing.assert_array_equal(pos, np.arange(len(x)) - first)
        start += len(x) + 1
    return ids


def n_rows_for(docs, seq_len):
    return -(-sum(len(d.encode()) for d in docs) // (seq_len + 1))


@pytest.fixture
def corpus(tmp_path):
    docs = random_docs(80, seed=1)
    return docs, write_jsonl(tmp_path / "corpus.jsonl", docs)


# ----------------------------------------------------------------------------- sources
def test_sources_round_trip_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = random_docs(23, seed=2)
    paragraphs = random_docs(9, seed=7, alphabet="abc é,.") + ["two lines\n  indented", "x"]
    seps = ["\n\n", "\n\n\n", "\r\n\r\n", "\n \t\n"]
    text = "\n\n" + "".join(p + seps[i % 4] for i, p in enumerate(paragraphs))
    (tmp_path / "a.txt").write_bytes(text.encode())
    src = load_source("t", str(tmp_path / "a.txt"), "text")
    assert [src[i] for i in range(len(src))] == paragraphs

    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps({"body": d}) for d in docs) + "\n\n  \n")
    src = load_source("j", str(path), "body")
    assert [src[i] for i in reversed(range(len(src)))] == docs[::-1]

    for name, as_json in (("c.array_record", True), ("d.array_record", False)):
        writer = ArrayRecordWriter(str(tmp_path / name), "group_size:1")
        for d in docs:
            writer.write((json.dumps({"text": d}) if as_json else d).encode())
        writer.close()
        src = load_source("ar", str(tmp_path / name), "text")
        assert [src[i] for i in range(len(src))] == docs

    table = pa.table({"text": docs, "n": list(range(len(docs)))})
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=4)
    src = load_source("p", str(tmp_path / "e.parquet"), "text")
    order = np.random.default_rng(0).permutation(len(docs))
    assert [src[int(i)] for i in order] == [docs[i] for i in order]

    write_jsonl(tmp_path / "shard-1.jsonl", docs[10:])  # glob: files in sorted order, mixed formats
    write_jsonl(tmp_path / "shard-0.jsonl", docs[:10])
    src = load_source("g", str(tmp_path / "shard-*.jsonl"), "text")
    assert [src[i] for i in range(len(src))] == docs


def test_embedded_corpus_is_the_pydoc_topics():
    from pydoc_data.topics import topics

    src = load_source("embedded", "embedded", "text")
    assert len(src) == len(topics) > 50
    assert src[0] == topics[sorted(topics)[0]]
    assert sum(len(src[i]) for i in range(len(src))) > 200_000


def one_line_error(fn, *fragments):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_source_errors_are_one_line_and_name_the_culprit(tmp_path):
    pattern = str(tmp_path / "missing-*.jsonl")
    one_line_error(
        lambda: load_source("web", pattern, "text"), f"config.data.sources.web: no files match {pattern!r}"
    )
    for name, content in (("empty.txt", "\n \n\n"), ("empty.jsonl", "\n\n"), ("zero.jsonl", "")):
        (tmp_path / name).write_text(content)
        one_line_error(
            lambda n=name: load_source("s", str(tmp_path / n), "text"),
            "config.data.sources.s",
            str(tmp_path / name),
            "no documents",
        )
    (tmp_path / "bad.txt").write_bytes(b"fine text\n\nbad \xff\xfe bytes")
    one_line_error(
        lambda: load_source("s", str(tmp_path / "bad.txt"), "text"), str(tmp_path / "bad.txt"), "UTF-8"
    )
    (tmp_path / "x.csv").write_text("a,b\n")
    one_line_error(
        lambda: load_source("s", str(tmp_path / "x.csv"), "text"),
        str(tmp_path / "x.csv"),
        "unknown file type",
    )

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "ok"\n{"other": 1}\n')
    src = load_source("s", str(path), "text")
    assert src[0] == "ok"
    one_line_error(lambda: src[1], f"{path}:3", "not valid JSON")
    one_line_error(lambda: src[2], f"{path}:4", "'text'")
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    one_line_error(lambda: load_source("s", str(path), "text")[1], f"{path}:2", "UTF-8")


# ----------------------------------------------------------------------------- tokenizers
def train_tokenizers(tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    src = load_source("e", "embedded", "text")
    (tmp_path / "train.txt").write_text("\n".join(src[i] for i in range(20)))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=0.99,
        byte_fallback=True,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(
        [str(tmp_path / "train.txt")],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path / "sp.model"), str(tmp_path / "tokenizer.json")


def test_tokenizers_round_trip(tmp_path):
    sp_path, hf_path = train_tokenizers(tmp_path)
    texts = random_docs(5, seed=3) + ["Héllo,  wörld!\n\n  indented 🤖 line\ttab"]
    byte = load_tokenizer("bytes")
    assert isinstance(byte, ByteTokenizer) and byte.vocab_size == 256 and byte.eos_id is None
    for spec, eos in (("bytes", None), (sp_path, 2), (hf_path, 0)):
        tok = load_tokenizer(spec)
        assert tok.eos_id == eos
        for text in texts:
            ids = tok.encode(text)
            assert all(0 <= i < tok.vocab_size for i in ids) and tok.decode(ids) == text
        if spec != "bytes":
            assert len(tok.encode(texts[-1])) < len(texts[-1].encode())  # real subword merges
    one_line_error(
        lambda: check_vocab(load_tokenizer(hf_path), 256),
        f"config.data.tokenizer={hf_path!r}",
        "config.model.vocab_size=256",
        "400",
    )
    one_line_error(lambda: load_tokenizer(str(tmp_path / "nope.model")), "config.data.tokenizer")


def test_pipeline_with_sentencepiece_appends_eos(tmp_path, corpus):
    sp_path, _ = train_tokenizers(tmp_path)
    config = make_config({"c": corpus[1]})
    config.data.tokenizer = sp_path
    one_line_error(
        lambda: make_train_iterator(config, process_index=0, process_count=1),
        "config.data.tokenizer",
        "config.model.vocab_size=256",
    )
    config.model.vocab_size = 512
    batch = next(make_train_iterator(config, process_index=0, process_count=1))
    assert batch["inputs"].max() < 400
    ends = batch["loss_mask"] == 0  # the last token of every document piece that ends in the row
    ends[:, -1] = False
    assert ends.any() and (batch["inputs"][ends] == 2).all()


# ----------------------------------------------------------------------------- packing
def pack(docs, row_len):
    parent = grain.MapDataset.source([np.asarray(d, np.int32) for d in docs]).to_iter_dataset()
    return PackIterator(parent.__iter__(), row_len)


def test_packing_hand_made_example():
    docs = [[1, 2, 3, 4, 5], [6, 7, 8], [], [9, 10, 11, 12, 13, 14, 15], [16, 17]]
    batch = rows_to_batch(list(pack(docs, 5)))
    np.testing.assert_array_equal(
        batch["inputs"], [[1, 2, 3, 4], [6, 7, 8, 9], [11, 12, 13, 14], [16, 17, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["targets"], [[2, 3, 4, 5], [7, 8, 9, 10], [12, 13, 14, 15], [17, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["positions"], [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    )
    np.testing.assert_array_equal(
        batch["loss_mask"], [[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    )
    assert {k: v.dtype for k, v in batch.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "loss_mask": np.float32,
    }


def test_packing_keeps_every_token_and_resumes_anywhere():
    rng = np.random.default_rng(4)
    docs = [rng.integers(1, 256, rng.integers(0, 40)) for _ in range(60)]
    rows = list(pack(docs, 17))
    flat = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
    np.testing.assert_array_equal(flat, np.concatenate(docs))
    assert all((r["segment_ids"] > 0).all() for r in rows[:-1])  # padding only in the last row
    it = pack(docs, 17)
    for k in range(len(rows)):
        fresh = pack(docs, 17)
        fresh.set_state(json.loads(json.dumps(it.get_state())))
        rest = list(fresh)
        assert len(rest) == len(rows) - k
        for a, b in zip(rest, rows[k:], strict=True):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
            np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
        next(it)


def test_positions_match_the_model():
    from turbos_jax.model import segment_positions

    batch = rows_to_batch(list(pack([[1] * 7, [2] * 3, [3] * 12, [4] * 2], 9)))
    np.testing.assert_array_equal(batch["positions"], segment_positions(batch["segment_ids"]))


# ----------------------------------------------------------------------------- pipeline
def test_one_epoch_holds_every_training_document_once(corpus):
    docs, path = corpus
    config = make_config({"c": path}, seq_len=24)
    train, held = split_documents(len(docs), 0.1)
    assert len(held) == 8 and not set(train) & set(held) and len(train) + len(held) == len(docs)
    it = make_train_iterator(config, process_index=0, process_count=1)
    n = -(-n_rows_for([docs[i] for i in train], 24) // 4) + 2
    ids = parse_stream(take(it, n), dict(enumerate(docs)))
    assert sorted(ids[: len(train)]) == list(train)  # first epoch: each training doc exactly once
    assert ids[: len(train)] != sorted(ids[: len(train)])  # shuffled
    assert ids[len(train) :] and ids[len(train) :] != ids[: len(ids) - len(train)]  # reshuffled


def test_eval_split_is_held_out_and_fixed(corpus):
    docs, path = corpus
    config = make_config({"c": path}, seq_len=24)
    train, held = split_documents(len(docs), 0.1)
    batches = list(make_eval_iterator(config, process_index=0, process_count=1))
    assert len(batches) == config.eval_batches
    assert_same(batches, list(make_eval_iterator(config, process_index=0, process_count=1)))
    ids = parse_stream(batches, dict(enumerate(docs)))
    assert set(ids) <= set(held) and len(set(ids)) > 1
    seen = parse_stream(
        take(make_train_iterator(config, process_index=0, process_count=1), 80), dict(enumerate(docs))
    )
    assert set(seen) == set(train)
    assert split_documents(len(docs), 0.1)[1].tolist() == held.tolist()  # not seed-dependent
    config.data.eval_fraction = 0.0
    one_line_error(
        lambda: make_eval_iterator(config, process_index=0, process_count=1), "config.data.eval_fraction"
    )


def test_processes_read_disjoint_shards(corpus):
    docs, path = corpus
    config = make_config({"c": path}, batch_size=4, seq_len=24)
    train, _ = split_documents(len(docs), 0.1)
    firsts = []
    for p in range(2):
        it = make_train_iterator(config, process_index=p, process_count=2)
        shard = [docs[i] for i in train[p::2]]
        batches = take(it, n_rows_for(shard, 24) // 2 + 2)
        assert batches[0]["inputs"].shape == (2, 24)
        ids = parse_stream(batches, dict(enumerate(docs)))
        firsts.append(set(ids[: len(shard)]))
    assert not firsts[0] & firsts[1] and firsts[0] | firsts[1] == set(train)
    one_line_error(
        lambda: make_train_iterator(config, process_index=0, process_count=3), "config.batch_size=4"
    )


def test_determinism_from_seed(corpus):
    config = make_config({"c": corpus[1]})
    a = take(make_train_iterator(config, process_index=0, process_count=1), 3)
    assert_same(a, take(make_train_iterator(config, process_index=0, process_count=1), 3))
    config.seed = 1
    b = take(make_train_iterator(config, process_index=0, process_count=1), 3)
    assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])


def two_sources(tmp_path):
    a = random_docs(40, seed=5, alphabet="abcdefgh ")
    b = random_docs(40, seed=6, alphabet="ABCDEFGH ")
    return {"a": write_jsonl(tmp_path / "a.jsonl", a), "b": write_jsonl(tmp_path / "b.jsonl", b)}


def row_sources(batch):
    """'a' / 'b' per row: which alphabet its letters come from."""
    out = []
    for row in batch["inputs"]:
        lower, upper = ((row >= 97) & (row <= 104)).sum(), ((row >= 65) & (row <= 72)).sum()
        assert (lower == 0) != (upper == 0)
        out.append("a" if lower else "b")
    return out


def test_mixture_weights_and_phase_switch(tmp_path):
    sources = two_sources(tmp_path)
    mixture = ((0, {"a": 3.0, "b": 1.0}), (6, {"b": 1.0}), (9, {"a": 1.0, "b": 1.0}))
    config = make_config(sources, mixture, batch_size=8, seq_len=16)
    rows = [row_sources(b) for b in take(make_train_iterator(config, process_index=0, process_count=1), 30)]
    first = sum(rows[:6], [])
    assert abs(first.count("a") / len(first) - 0.75) < 0.05
    assert all(s == "b" for r in rows[6:9] for s in r)
    last = sum(rows[9:], [])
    assert abs(last.count("a") / len(last) - 0.5) < 0.05
    # a source's stream continues across phases: the 'a' rows equal an 'a'-only run's rows
    mixed = [
        row
        for b in take(make_train_iterator(config, process_index=0, process_count=1), 30)
        for row, s in zip(b["inputs"], row_sources(b), strict=True)
        if s == "a"
    ]
    alone = make_config(sources, ((0, {"a": 1.0}),), batch_size=8, seq_len=16)
    only = np.concatenate(
        [b["inputs"] for b in take(make_train_iterator(alone, process_index=0, process_count=1), 30)]
    )
    np.testing.assert_array_equal(np.stack(mixed), only[: len(mixed)])


@pytest.mark.parametrize(
    "mixture, fragment",
    [
        ((), "non-empty"),
        ((5, {"a": 1.0}), "phase 0 must be"),
        (((3, {"a": 1.0}),), "must start at step 0"),
        (((0, {"a": 1.0}), (0, {"b": 1.0})), "first steps must increase"),
        (((0, {"a": 1.0}), (9, {"b": 1.0}), (4, {"a": 1.0})), "phase 2 starts at step 4"),
        (((0, {"web": 1.0}),), "'web', which is not in config.data.sources (a, b)"),
        (((0, {"a": 0.0}),), "weight of 'a' must be a positive number"),
        (((0, {"a": 1.0, "b": -2}),), "weight of 'b'"),
        (((0, {}),), "names no sources"),
    ],
)
def test_bad_mixture_is_one_line_error(tmp_path, mixture, fragment):
    config = make_config(two_sources(tmp_path))
    config.data.mixture = mixture
    one_line_error(
        lambda: make_train_iterator(config, process_index=0, process_count=1),
        "config.data.mixture:",
        fragment,
    )


def test_resume_equals_uninterrupted_stream_across_phase_switch(tmp_path):
    sources = two_sources(tmp_path)
    # interleave periods (3 and 5 rows) do not divide the batch (4): the mix position matters
    config = make_config(
        sources, ((0, {"a": 2.0, "b": 1.0}), (5, {"b": 4.0, "a": 1.0})), batch_size=4, seq_len=40
    )
    it = make_train_iterator(config, process_index=0, process_count=1)
    full = take(it, 12)
    for k in (0, 2, 4, 5, 7):
        original = make_train_iterator(config, process_index=0, process_count=1)
        take(original, k)
        state = json.loads(json.dumps(original.get_state()))
        assert state["step"] == k
        restored = make_train_iterator(config, process_index=0, process_count=1)
        restored.set_state(state)
        assert_same(take(restored, 12 - k), full[k:])
        assert_same(take(original, 12 - k), full[k:])


def test_orbax_checkpoint_of_the_iterator(tmp_path, corpus):
    import orbax.checkpoint as ocp

    config = make_config({"c": corpus[1]})
    it = make_train_iterator(config, process_index=0, process_count=1)
    take(it, 3)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options, item_names=("data",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        expected = take(it, 4)  # advancing right after an async save must not change what it saved
        mngr.wait_until_finished()
    restored = make_train_iterator(config, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same(take(restored, 4), expected)


def test_worker_processes_match_in_process(corpus):
    config = make_config({"c": corpus[1]})
    expected = take(make_train_iterator(config, process_index=0, process_count=1), 5)
    config.data.worker_count = 1
    it = make_train_iterator(config, process_index=0, process_count=1)
    try:
        got = take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        got += take(it, 3)
    finally:
        it.close()
    assert_same(got, expected)
    it = make_train_iterator(config, process_index=0, process_count=1)
    try:
        it.set_state(state)
        assert_same(take(it, 3), expected[2:])
    finally:
        it.close()
