"""RL prompt sources (turbos_jax/posttrain/prompts.py): record checks with one-line errors, the
mixture's proportions, and a restored position drawing exactly what the uninterrupted stream draws."""

import json

import numpy as np
import pytest

from turbos_jax.posttrain.prompts import PromptError, PromptStream, check_prompt_lengths, load_records


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_load_records_and_errors(tmp_path):
    good = _write(tmp_path / "a.jsonl", [{"prompt": "1+1=", "answer": 2}, {"prompt": "f?", "answer": "x"}])
    recs = load_records(good, prompt_key="prompt", answer_key="answer", kind="answer")
    assert recs[0] == {"prompt": "1+1=", "answer": "2", "kind": "answer"}
    code = _write(tmp_path / "c.jsonl", [{"prompt": "write f", "tests": ["assert f() == 1"]}])
    assert load_records(code, prompt_key="prompt", answer_key="answer", kind="code")[0]["tests"] == [
        "assert f() == 1"
    ]
    cases = {
        "not JSON": ([{"prompt": "a", "answer": "1"}, "{oops"], "b.jsonl:2: not JSON"),
        "no answer": ([{"prompt": "a"}], "b.jsonl:1: missing 'answer'"),
        "empty prompt": ([{"prompt": "", "answer": "1"}], "b.jsonl:1: expected an object with a non-empty"),
        "empty file": ([], "b.jsonl: no records"),
    }
    for rows, message in cases.values():
        path = _write(tmp_path / "b.jsonl", rows)
        with pytest.raises(PromptError, match=message):
            load_records(path, prompt_key="prompt", answer_key="answer", kind="answer")
    # A bare string would run each character as a test ("1" passes anything): refused.
    for tests in ("assert f() == 1", [], [1]):
        path = _write(tmp_path / "t.jsonl", [{"prompt": "write f", "tests": tests}])
        with pytest.raises(PromptError, match="t.jsonl:1: 'tests' must be a non-empty list of snippet"):
            load_records(path, prompt_key="prompt", answer_key="answer", kind="code")
    with pytest.raises(PromptError, match="no such prompt file"):
        load_records(str(tmp_path / "missing.jsonl"), prompt_key="prompt", answer_key="answer", kind="answer")


def test_overlong_prompts_are_refused_before_training():
    records = [{"prompt": "1+1="}, {"prompt": "123456789+1="}]
    check_prompt_lengths(records[:1], str.encode, 8, "config.rl.sources['m'] m.jsonl")
    with pytest.raises(PromptError, match=r"m.jsonl: record 2 \('123456789\+1='\) has 12 prompt tokens > "):
        check_prompt_lengths(records, str.encode, 8, "config.rl.sources['m'] m.jsonl")


def test_mixture_and_exact_resume():
    math = [{"prompt": f"m{i}", "answer": str(i)} for i in range(7)]
    code = [{"prompt": f"c{i}", "tests": []} for i in range(5)]
    stream = PromptStream({"math": math, "code": code}, seed=3)
    drawn = stream.draw(4000, {"math": 2, "code": 1})
    share = np.mean([r["source"] == "math" for r in drawn])
    assert abs(share - 2 / 3) < 0.03
    # Every pass over a source visits each record once, in a new order.
    firsts = [r["prompt"] for r in PromptStream({"math": math}, seed=3).draw(14, {"math": 1})]
    assert sorted(firsts[:7]) == sorted(firsts[7:]) == sorted(r["prompt"] for r in math)
    assert firsts[:7] != firsts[7:]

    a = PromptStream({"math": math, "code": code}, seed=1)
    a.draw(9, {"math": 1, "code": 1})
    saved = a.get_state()
    expected = [r["prompt"] for r in a.draw(20, {"math": 1, "code": 3})]
    b = PromptStream({"math": math, "code": code}, seed=1)
    b.set_state(saved)
    assert [r["prompt"] for r in b.draw(20, {"math": 1, "code": 3})] == expected
    with pytest.raises(PromptError, match="differ from the config's"):
        PromptStream({"math": math}, seed=1).set_state(saved)
    with pytest.raises(PromptError, match="unknown or no sources"):
        a.draw(1, {"logic": 1})
