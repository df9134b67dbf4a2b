"""SFT data (turbos_jax/data/sft.py): rendering, response-only loss mask, packing, resume, bad records;
and the exact-match scorer's plumbing (posttrain/evaluation.py) with a scripted generator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import sft_tiny
from turbos_jax.data import DataError
from turbos_jax.data import sft as sft_data
from turbos_jax.posttrain import evaluation

RECORDS = [
    {"prompt": "478+256=", "response": "8+6=14 7+5+1=13 4+2+1=7 #### 734"},
    {"prompt": "12+30=", "response": "2+0=2 1+3=4 #### 42"},
    {"prompt": "999+1=", "response": "9+1=10 9+0+1=10 9+0+1=10 #### 1000"},
]


def _config(**sft):
    config = sft_tiny.get_config()
    config.batch_size, config.seq_len = 4, 64
    for k, v in sft.items():
        config.sft[k] = v
    return config


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _text(ids) -> str:
    return bytes(int(i) for i in ids).decode()


def test_prompt_response_renders_with_stop_and_response_only_mask():
    fmt = sft_data.make_format(_config())
    example = sft_data.render(RECORDS[0], fmt)
    assert _text(example.ids) == RECORDS[0]["prompt"] + RECORDS[0]["response"] + "\n"
    assert _text(example.prompt_ids) == RECORDS[0]["prompt"]
    assert example.reference == "734"  # extracted from the response ("answer" absent)
    feats = sft_data._features(example)
    # Targets with loss are exactly the response and its stop byte ...
    assert _text(feats["targets"][feats["loss_mask"] == 1]) == RECORDS[0]["response"] + "\n"
    # ... and the mask is not the unshifted one (negative control: that would train on the prompt's
    # last byte "=" and miss the stop byte).
    assert _text(feats["targets"][example.weights[:-1] == 1]) != RECORDS[0]["response"] + "\n"


def test_chat_turns_train_on_every_assistant_turn_with_the_template():
    prefixes = {"system": "S:", "user": "U:", "assistant": "A:"}
    fmt = sft_data.make_format(_config(role_prefixes=prefixes))
    record = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "1+1="},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2="},
            {"role": "assistant", "content": "#### 4"},
        ],
        "answer": "4",
    }
    example = sft_data.render(record, fmt)
    assert _text(example.ids) == "S:be briefU:1+1=A:2\nU:2+2=A:#### 4\n"
    assert _text(example.ids[example.weights == 1]) == "2\n#### 4\n"
    assert _text(example.prompt_ids) == "S:be briefU:1+1=A:2\nU:2+2=A:"
    assert example.reference == "4"


def test_packed_batches_hold_whole_examples_and_resume_exactly(tmp_path):
    config = _config()
    fmt = sft_data.make_format(config)
    examples = sft_data.read_examples(_write(tmp_path / "t.jsonl", RECORDS * 5), fmt, key="train_file")
    it = sft_data.make_sft_train_iterator(config, examples, process_index=0, process_count=1)
    wanted = {_text(e.ids[:-1]) for e in examples}
    for _ in range(3):
        batch = next(it)
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
        assert batch["inputs"].shape == (4, 64)
        for row in range(4):
            segs = batch["segment_ids"][row]
            assert not batch["loss_mask"][row][segs == 0].any()  # no loss on padding
            for s in set(segs.tolist()) - {0}:
                where = segs == s
                assert _text(batch["inputs"][row][where]) in wanted  # a whole example, never split
                np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = sft_data.make_sft_train_iterator(config, examples, process_index=0, process_count=1)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"t.jsonl:2: not valid JSON"),
        ({"prompt": "1+1="}, r"t.jsonl:2: no string field 'response'"),
        ({"prompt": "1+1=", "response": "  "}, r"t.jsonl:2: empty response"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"t.jsonl:2: messages\[0\] must be"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"t.jsonl:2: no assistant turn"),
        ({"prompt": "1+1=", "response": "2" * 80}, r"t.jsonl:2: 85 tokens with the stop token, longer than"),
    ],
)
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
    fmt = sft_data.make_format(_config())
    path = _write(tmp_path / "t.jsonl", [RECORDS[0], line])
    with pytest.raises(DataError, match=r"^config\.sft\.train_file: .*" + message) as err:
        sft_data.read_examples(path, fmt, key="train_file", max_len=65)
    assert "\n" not in str(err.value)


def test_bad_format_settings_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"^config\.sft\.stop_text='<end>': must be one token, is 5"):
        sft_data.make_format(_config(stop_text="<end>"))
    with pytest.raises(DataError, match=r"^config\.sft\.stop_text='': .* has no EOS token"):
        sft_data.make_format(_config(stop_text=""))
    with pytest.raises(DataError, match=r"^config\.sft\.eval_file='.*none\*\.jsonl': no files match"):
        sft_data.read_examples(
            str(tmp_path / "none*.jsonl"), sft_data.make_format(_config()), key="eval_file"
        )


def test_exact_match_cuts_at_the_stop_token_and_scores_each_prompt(monkeypatch):
    """A scripted generator: right answers for even prompts, wrong ones for odd, text after the stop
    token (never reached by a real decode) and a batch that needs filling."""
    fmt = sft_data.make_format(_config())
    examples = [sft_data.render(r, fmt) for r in RECORDS]
    calls = []

    def scripted(graphdef, params, prompts, lengths, *, max_new_tokens, eos_id, sampling, rng):
        prompts, lengths = np.asarray(prompts), np.asarray(lengths)
        calls.append(prompts.shape)
        out = np.zeros((len(prompts), max_new_tokens), np.int32)
        count = np.zeros(len(prompts), np.int32)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            k = next(j for j, e in enumerate(examples) if _text(e.prompt_ids) == _text(p[:n]))
            text = RECORDS[k]["response"] if k % 2 == 0 else "#### 5"
            ids = [*text.encode(), eos_id]
            out[i, : len(ids)] = ids
            count[i] = len(ids)
        return out, count

    monkeypatch.setattr(evaluation, "generate", scripted)
    result = evaluation.examples_exact_match(None, None, examples, fmt, max_new_tokens=40, batch_size=2)
    assert result.correct == [True, False, True]
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.responses[1] == "#### 5"
    assert calls == [(2, 8), (2, 8)]  # fixed shapes: the last batch is filled
    # Negative control: references that do not match score zero.
    wrong = evaluation.exact_match(
        None,
        None,
        [e.prompt_ids for e in examples],
        ["1", "2", "3"],
        tokenizer=fmt.tokenizer,
        stop_id=fmt.stop_id,
        max_new_tokens=40,
        batch_size=2,
    )
    assert wrong.accuracy == 0.0
