"""Deliberation rounds (posttrain/deliberate.py) with fake judges: position swap, majority and weighted
consensus, the weakness profile, next-round SFT data, and the CLI on response files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from turbos_jax.posttrain import deliberate as dl

PROMPTS = [
    {"prompt": "1+1=", "answer": "2", "category": "add"},
    {"prompt": "2+2=", "answer": "4", "category": "add"},
    {"prompt": "3*3=", "answer": "9", "category": "mul"},
]
MINE = ["#### 2", "#### 5", "3*3=9 #### 9"]
RIVAL = ["1+1=2 #### 2", "#### 4", "#### 6"]


def first_always_wins(prompt, first, second, reference):
    return {"helpfulness": 1.0}


def likes_long(prompt, first, second, reference):
    return {"helpfulness": float(len(first) > len(second)) - float(len(first) < len(second))}


def test_position_swap_cancels_a_position_preference():
    scores = dl.pair_scores({"biased": first_always_wins}, "p", "a", "b", None)
    assert scores == {"biased": {"helpfulness": 0.0}}
    assert dl.consensus(scores)["outcome"] == "tie"


def test_verifier_judges_accuracy_then_conciseness():
    assert dl.pair_scores({"v": dl.verifier_judge}, "1+1=", "#### 2", "#### 3", "2")["v"] == {"accuracy": 1.0}
    both = dl.pair_scores({"v": dl.verifier_judge}, "1+1=", "#### 2", "1+1=2 #### 2", "2")["v"]
    assert both == {"accuracy": 0.0, "conciseness": 1.0}
    assert dl.pair_scores({"v": dl.verifier_judge}, "x", "a", "b", None)["v"] == {}  # no reference: abstains


def test_majority_and_weighted_consensus_differ_when_judges_disagree():
    scores = {"a": {"helpfulness": 1.0}, "b": {"helpfulness": -0.5}, "c": {"helpfulness": -0.5}}
    assert dl.consensus(scores, mode="majority")["dimensions"] == {"helpfulness": -1}
    weighted = dl.consensus(scores, mode="weighted", weights={"a": 3.0, "b": 1.0, "c": 1.0})
    assert weighted["dimensions"] == {"helpfulness": 1} and weighted["outcome"] == "win"
    with pytest.raises(ValueError, match="consensus mode 'best'"):
        dl.consensus(scores, mode="best")


def test_likelihood_judge_prefers_the_likelier_response():
    judge = dl.LikelihoodJudge(lambda prompts, responses: [-len(r) for r in responses])
    assert dl.pair_scores({"l": judge}, "p", "short", "much longer", None) == {"l": {"coherence": 1.0}}


def test_profile_and_next_round_data():
    judges = {"verifier": dl.verifier_judge, "long": likes_long}
    profile, next_sft, judgements = dl.deliberate(
        PROMPTS, MINE, {"rival": RIVAL, "weak": ["#### 0"] * 3}, judges, worst=2
    )
    assert len(judgements) == 6
    add = profile["rival"]["add"]
    # 1+1: both right, mine shorter (conciseness +1) but less long (helpfulness -1) -> tie;
    # 2+2: mine wrong (accuracy -1), same length (helpfulness 0) -> loss by 1.
    assert (add["n"], add["win"], add["loss"], add["tie"]) == (2, 0.0, 0.5, 0.5)
    assert add["worst_prompts"] == [{"prompt": "2+2=", "margin": -1}]
    assert profile["rival"]["mul"]["win"] == 1.0
    assert profile["weak"]["add"]["loss"] == 0.0
    assert next_sft == [{"prompt": "2+2=", "response": "#### 4", "source": "rival"}]
    with pytest.raises(ValueError, match="rival: 1 responses for 3 prompts"):
        dl.deliberate(PROMPTS, MINE, {"rival": ["x"]}, judges)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "turbos_jax.posttrain.deliberate", *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_on_response_files(tmp_path):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    prompts = write("prompts.jsonl", PROMPTS)
    mine = write(
        "mine.jsonl", [{"prompt": p["prompt"], "response": r} for p, r in zip(PROMPTS, MINE, strict=True)]
    )
    rival = write(
        "rival.jsonl", [{"prompt": p["prompt"], "response": r} for p, r in zip(PROMPTS, RIVAL, strict=True)]
    )
    out = _cli(
        f"--prompts={prompts}",
        f"--responses={mine}",
        f"--competitor={rival}",
        "--judges=verifier",
        f"--out_dir={tmp_path}/o",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vs rival [add]: win 50% loss 50% tie 0% (n=2)" in out.stdout  # 1+1: more concise
    profile = json.loads((tmp_path / "o" / "profile.json").read_text())
    assert profile["rival"]["mul"]["win"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "o" / "next_sft.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "2+2=", "response": "#### 4", "source": "rival"}]

    short = write("short.jsonl", [{"prompt": "1+1=", "response": "2"}])
    bad = _cli(
        f"--prompts={prompts}",
        f"--responses={mine}",
        f"--competitor={short}",
        "--judges=verifier",
        f"--out_dir={tmp_path}/o",
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: --competitor={short}: no response to prompt '2+2=' (2 missing)"
    )
