"""The embedded arithmetic task (turbos_jax/posttrain/arithmetic.py): determinism, disjoint splits,
correct references and worked solutions, the promised digit ranges, the JSONL writer and the CLI."""

import itertools
import json
import operator
import re
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from turbos_jax.posttrain import arithmetic
from turbos_jax.posttrain.answers import extract_answer, is_correct

_PYTHON_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_PROMPT = re.compile(r"(\d+)([-+*])(\d+)=")


def _draw(split="train", seed=0, num=300, levels=tuple(arithmetic.LEVELS), **kw):
    return arithmetic.generate(num, split=split, seed=seed, levels=levels, **kw)


def test_same_seed_same_problems():
    assert _draw(seed=3) == _draw(seed=3)
    assert _draw(seed=3) != _draw(seed=4)
    assert _draw("eval", seed=3, num=50) == _draw("eval", seed=3, num=50)


def test_pinned_problems_of_seed_0():
    """The first problems of seed 0, pinned: a change here changes every data set ever written."""
    got = [p.prompt for p in arithmetic.generate(6, split="eval", seed=0, levels=(1, 2, 3))]
    assert got == ["726-628=", "30+1=", "619*8=", "86+16=", "788*7=", "260+879="]


def test_splits_are_disjoint_across_seeds():
    ids = {}
    for split in arithmetic.SPLITS:
        ids[split] = {p.id for seed in range(4) for p in _draw(split, seed=seed, num=1000)}
    for a, b in itertools.combinations(ids, 2):
        assert not ids[a] & ids[b], (a, b)
    for split, members in ids.items():
        for p in members:
            op, a, b = p.split("-")
            assert arithmetic.split_of(op, int(a), int(b)) == split


def test_split_ignores_operand_order_and_matches_fractions():
    assert arithmetic.split_of("add", 123, 456) == arithmetic.split_of("add", 456, 123)
    assert arithmetic.split_of("mul", 47, 38) == arithmetic.split_of("mul", 38, 47)
    counts = {name: 0 for name in arithmetic.SPLITS}
    for a, b in itertools.product(range(100, 300), range(100, 200)):
        counts[arithmetic.split_of("add", a, b)] += 1
    total = sum(counts.values())
    for name, fraction in arithmetic.SPLITS.items():
        assert abs(counts[name] / total - fraction) < 0.01, counts


def test_eval_file_does_not_depend_on_other_sizes(tmp_path):
    kw = dict(num_eval=30, seed=2, levels=(1, 2), metadata=True)
    small = arithmetic.write_task_files(str(tmp_path / "a"), num_train=10, num_rl=5, **kw)
    large = arithmetic.write_task_files(str(tmp_path / "b"), num_train=500, num_rl=50, **kw)
    with open(small["eval"]) as f, open(large["eval"]) as g:
        assert f.read() == g.read()


@pytest.mark.parametrize("level", sorted(arithmetic.LEVELS))
def test_references_solutions_and_digit_ranges(level):
    spec = arithmetic.LEVELS[level]
    problems = _draw(num=400, levels=(level,)) + _draw("eval", num=100, levels=(level,))
    assert {p.difficulty for p in problems} == {level}
    assert {p.operation for p in problems} == set(spec.operations)
    for p in problems:
        a, sym, b = _PROMPT.fullmatch(p.prompt).groups()
        a, b = int(a), int(b)
        assert (a, b) == p.operands and p.operation == {"+": "add", "-": "sub", "*": "mul"}[sym]
        assert p.answer == str(_PYTHON_OPS[sym](a, b)) and int(p.answer) >= 0
        assert spec.a_range[0] <= a <= spec.a_range[1] or p.operation == "sub"
        assert spec.b_range[0] <= b <= spec.b_range[1] or p.operation == "sub"
        if p.operation == "sub":
            lo, hi = spec.a_range
            assert lo <= b <= a <= hi
        assert extract_answer(p.solution) == p.answer and is_correct(p.solution, p.answer)
        assert is_correct(p.answer, p.answer)
        assert "\n" not in p.prompt + p.solution
        assert len(p.prompt + p.solution) <= arithmetic.MAX_TEXT_BYTES


def test_digit_ranges_are_covered():
    """Both ends of each level's operand ranges occur (the levels give the digit counts they promise)."""
    for level, spec in arithmetic.LEVELS.items():
        problems = _draw(num=4000, levels=(level,), operations=["add", "mul"])
        a_digits = {len(str(p.operands[0])) for p in problems}
        b_digits = {len(str(p.operands[1])) for p in problems}
        assert a_digits == set(range(len(str(spec.a_range[0])), len(str(spec.a_range[1])) + 1))
        assert b_digits == set(range(len(str(spec.b_range[0])), len(str(spec.b_range[1])) + 1))


def test_worked_solutions():
    p = arithmetic.make_problem("add", 478, 256, 2)
    assert (p.prompt, p.solution, p.carries) == ("478+256=", "8+6=14 7+5+1=13 4+2+1=7 #### 734", 2)
    p = arithmetic.make_problem("sub", 523, 168, 2)
    assert (p.prompt, p.solution, p.carries) == ("523-168=", "3-8=-5 2-6-1=-5 5-1-1=3 #### 355", 2)
    p = arithmetic.make_problem("mul", 47, 38, 5)
    assert p.solution == "7*8=56 4*8+5=37 -> 376; 7*3=21 4*3+2=14 -> 1410; 376+1410=1786 #### 1786"
    assert arithmetic.make_problem("sub", 100, 99, 1).solution == "0-9=-9 0-9-1=-10 1-0-1=0 #### 1"


def test_worst_case_length():
    longest = max(
        len(p.prompt + p.solution)
        for p in (
            arithmetic.make_problem("mul", a, b, 5) for a, b in itertools.product(range(10, 100), repeat=2)
        )
    )
    assert longest == 78 <= arithmetic.MAX_TEXT_BYTES


def test_operation_mix_and_uniqueness():
    adds = _draw(num=200, levels=(1, 2), operations={"add": 1.0})
    assert {p.operation for p in adds} == {"add"}
    mix = _draw(num=2000, levels=(2,), operations={"add": 3, "sub": 1})
    assert 0.7 < sum(p.operation == "add" for p in mix) / len(mix) < 0.8
    with pytest.raises(ValueError, match="level 3"):
        _draw(levels=(3,), operations=["add"])
    distinct = _draw("eval", num=300, levels=(1, 3), unique=True)
    assert len({p.id for p in distinct}) == 300
    assert sum(p.difficulty == 1 for p in distinct) == 150
    with pytest.raises(ValueError, match="too small"):
        _draw("eval", num=3000, levels=(3,), unique=True)


def test_jsonl_writer_keys(tmp_path):
    problems = _draw(num=5)
    path = tmp_path / "sft.jsonl"
    assert arithmetic.write_jsonl(str(path), problems) == 5
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"prompt": p.prompt, "response": p.solution} for p in problems]
    arithmetic.write_jsonl(str(path), problems, arithmetic.EVAL_KEYS)
    assert json.loads(path.read_text().splitlines()[0]) == {
        "prompt": problems[0].prompt,
        "answer": problems[0].answer,
    }
    arithmetic.write_jsonl(
        str(path), problems, {"question": "prompt", "target": "answer", "level": "difficulty"}
    )
    row = json.loads(path.read_text().splitlines()[0])
    assert row == {
        "question": problems[0].prompt,
        "target": problems[0].answer,
        "level": problems[0].difficulty,
    }
    with pytest.raises(ValueError, match="unknown problem field"):
        arithmetic.write_jsonl(str(path), problems, {"prompt": "question"})


def _cli(*args):
    cmd = [sys.executable, "-m", "turbos_jax.posttrain.arithmetic", *args]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def test_cli_writes_three_files(tmp_path):
    out = _cli(f"--out_dir={tmp_path}", "--num_train=40", "--num_eval=12", "--num_rl=8", "--seed=5")
    assert out.returncode == 0, out.stderr[-2000:]
    files = {
        name: (tmp_path / name).read_text().splitlines()
        for name in ("train.jsonl", "eval.jsonl", "rl_prompts.jsonl")
    }
    assert [len(lines) for lines in files.values()] == [40, 12, 8]
    assert set(json.loads(files["train.jsonl"][0])) == {"prompt", "response"}
    assert set(json.loads(files["eval.jsonl"][0])) == {"prompt", "response", "answer"}
    assert set(json.loads(files["rl_prompts.jsonl"][0])) == {"prompt", "answer"}
    expected = arithmetic.generate(12, split="eval", seed=5, levels=(1, 2, 3), unique=True)
    assert [json.loads(line)["prompt"] for line in files["eval.jsonl"]] == [p.prompt for p in expected]
    prompts = {name: {json.loads(line)["prompt"] for line in lines} for name, lines in files.items()}
    assert not prompts["train.jsonl"] & prompts["eval.jsonl"]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--levels=1,9"], "--levels"),
        (["--levels=two"], "--levels"),
        (["--levels=1,1"], "--levels"),
        (["--operations=add,pow"], "--operations"),
        (["--levels=3", "--operations=add"], "--operations"),
        (["--num_eval=-1"], "--num_eval"),
        (["--response=cot"], "--response"),
    ],
    ids=[
        "unknown-level",
        "not-a-number",
        "repeated-level",
        "unknown-operation",
        "level-without-operation",
        "negative-count",
        "response",
    ],
)
def test_cli_one_line_errors(tmp_path, args, flag):
    out = _cli(f"--out_dir={tmp_path}", *args)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], out.stderr
    assert not list(tmp_path.iterdir())  # nothing written
