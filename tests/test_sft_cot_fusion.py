"""Adaptive long-short CoT fusion (posttrain/cot_fusion.py) with deterministic fake generators:
kept short answers, solved after 1 and 2 continuations, never solved, round limit, bad generators,
the CLI's one-line errors, and output that SFT reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from configs import sft_tiny
from turbos_jax.data import sft as sft_data
from turbos_jax.posttrain import cot_fusion

SEP = " | retry | "
PROBLEMS = [
    {"prompt": "1+1=", "answer": "2"},  # the short model is right
    {"prompt": "2+2=", "answer": "4"},  # solved by the first continuation
    {"prompt": "3+3=", "answer": "6"},  # solved by the second continuation
    {"prompt": "4+4=", "answer": "8"},  # never solved
]
SHORT = {"1+1=": "#### 2", "2+2=": "#### 5", "3+3=": "#### 7", "4+4=": "#### 9"}
# The strong reasoner's continuation by (prompt, attempts so far).
STRONG = {("2+2=", 1): "2+2=4 #### 4", ("3+3=", 1): "#### 5", ("3+3=", 2): "3+3=6 #### 6"}


class FakeStrong:
    def __init__(self, separator=SEP):
        self.calls, self.separator = [], separator

    def __call__(self, prompts, continuations):
        self.calls.append((list(prompts), list(continuations)))
        out = []
        for p, c in zip(prompts, continuations, strict=True):
            assert c.endswith(self.separator)
            out.append(STRONG.get((p, c.count(self.separator)), "#### 0"))
        return out


def _short(prompts):
    return [SHORT[p] for p in prompts]


def test_every_branch():
    strong = FakeStrong()
    result = cot_fusion.fuse(PROBLEMS, _short, strong, max_rounds=3, separator=SEP)
    assert result.records == [
        {"prompt": "1+1=", "response": "#### 2", "answer": "2", "rounds": 0},
        {"prompt": "2+2=", "response": "#### 5 | retry | 2+2=4 #### 4", "answer": "4", "rounds": 1},
        {
            "prompt": "3+3=",
            "response": "#### 7 | retry | #### 5 | retry | 3+3=6 #### 6",
            "answer": "6",
            "rounds": 2,
        },
    ]
    assert result.unsolved == [
        {"prompt": "4+4=", "answer": "8", "attempts": ["#### 9", "#### 0", "#### 0", "#### 0"]}
    ]
    assert result.rounds == {0: 1, 1: 1, 2: 1, 3: 0}
    # Each round asks only about the open problems, with every attempt so far.
    assert strong.calls[0] == (["2+2=", "3+3=", "4+4="], ["#### 5" + SEP, "#### 7" + SEP, "#### 9" + SEP])
    assert strong.calls[1][0] == ["3+3=", "4+4="]
    assert [len(c[0]) for c in strong.calls] == [3, 2, 1]


def test_round_limit_and_no_strong_rounds():
    result = cot_fusion.fuse(PROBLEMS, _short, FakeStrong(), max_rounds=1, separator=SEP)
    assert [r["prompt"] for r in result.records] == ["1+1=", "2+2="]
    assert [u["prompt"] for u in result.unsolved] == ["3+3=", "4+4="]
    strong = FakeStrong()
    result = cot_fusion.fuse(PROBLEMS, _short, strong, max_rounds=0, separator=SEP)
    assert [r["prompt"] for r in result.records] == ["1+1="] and not strong.calls


def test_generator_returning_the_wrong_count_is_an_error():
    with pytest.raises(ValueError, match="the short generator returned 1 responses for 4 prompts"):
        cot_fusion.fuse(PROBLEMS, lambda prompts: ["#### 2"], FakeStrong())


def test_output_trains_with_sft(tmp_path):
    result = cot_fusion.fuse(PROBLEMS, _short, FakeStrong(cot_fusion.DEFAULT_SEPARATOR), max_rounds=3)
    path = tmp_path / "fused.jsonl"
    cot_fusion.write_jsonl(str(path), result.records)
    fmt = sft_data.make_format(sft_tiny.get_config())
    examples = sft_data.read_examples(str(path), fmt, key="train_file", max_len=129)
    assert [e.reference for e in examples] == ["2", "4", "6"]  # the final answer is the correct one
    assert all("\n" not in r["response"] for r in result.records)  # the default separator keeps "\n" the stop


def test_cli_bad_problems_file_is_one_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    args = [f"--{k}=x.py" for k in ("short_config", "strong_config")] + [
        "--short_workdir=a",
        "--strong_workdir=b",
    ]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "turbos_jax.posttrain.cot_fusion",
            f"--problems={bad}",
            f"--out={tmp_path}/o",
            *args,
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert (
        out.stderr.strip().splitlines()[-1]
        == f"error: --problems: {bad}:1: needs string fields 'prompt' and 'answer'"
    )
