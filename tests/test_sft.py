"""`turbos_jax.sft` end to end at tiny shapes: evaluation rows at step 0 and every eval, resume,
parameters from config.init_from, and one-line errors for bad data from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from configs import sft_tiny
from turbos_jax import sft
from turbos_jax.config import ConfigError
from turbos_jax.metrics import read_jsonl
from turbos_jax.posttrain import arithmetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith")
    return arithmetic.write_task_files(
        str(out), num_train=200, num_eval=8, num_rl=0, seed=0, levels=(1,), operations=("add",)
    )


def _config(data, total_steps, init_from=""):
    config = sft_tiny.get_config()
    config.model.layout = "AFMF"
    config.batch_size, config.seq_len, config.total_steps = 8, 64, total_steps  # 8 fake devices
    config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 1, 2, 2
    config.eval_batches = 1
    config.sft.train_file, config.sft.eval_file = data["train"], data["eval"]
    config.sft.eval_prompts, config.sft.eval_batch_size, config.sft.max_new_tokens = 4, 4, 8
    config.init_from = init_from
    return config


def _eval_rows(workdir) -> dict:
    return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval_loss" in r}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sft") / "run")
    sft.sft(_config(data, 4), workdir)
    return workdir


def test_evaluates_at_step_zero_and_every_eval(trained):
    rows = _eval_rows(trained)
    assert sorted(rows) == [0, 2, 4]
    for row in rows.values():
        assert 0.0 <= row["eval_exact_match"] <= 1.0
        assert 1 <= row["eval_response_tokens"] <= 8
    assert rows[4]["eval_loss"] < rows[0]["eval_loss"]  # it learns something in 4 steps
    assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["2", "4"]


def test_rerun_resumes_and_keeps_the_step_zero_row(data, trained, capfd):
    sft.sft(_config(data, 6), trained)
    assert "resuming from checkpoint step 4" in capfd.readouterr().out
    rows = _eval_rows(trained)
    assert sorted(rows) == [0, 2, 4, 6]
    train_steps = [r["step"] for r in read_jsonl(os.path.join(trained, "metrics.jsonl")) if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]


def test_init_from_starts_from_the_parameters(data, trained, tmp_path):
    """Step 0 of a run initialised from `trained` evaluates `trained`'s final parameters: the same
    eval loss as `trained`'s last evaluation; a run without init_from does not (negative control)."""
    source_last = _eval_rows(trained)
    source_last = source_last[max(source_last)]["eval_loss"]
    sft.sft(_config(data, 1, init_from=trained), str(tmp_path / "from"))
    assert _eval_rows(str(tmp_path / "from"))[0]["eval_loss"] == pytest.approx(source_last, rel=1e-5)
    sft.sft(_config(data, 1), str(tmp_path / "scratch"))
    assert _eval_rows(str(tmp_path / "scratch"))[0]["eval_loss"] != pytest.approx(source_last, rel=1e-2)


def test_missing_sft_key_names_it(data, tmp_path):
    config = _config(data, 1)
    del config.sft["stop_text"]
    with pytest.raises(ConfigError, match=r"^config\.sft\.stop_text: required key is missing"):
        sft.sft(config, str(tmp_path))


def test_cli_bad_record_is_one_line_and_writes_no_checkpoint(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "1+1=", "response": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n"
    )
    workdir = tmp_path / "w"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "turbos_jax.sft",
            "--config=configs/sft_tiny.py",
            f"--workdir={workdir}",
            f"--config.sft.train_file={bad}",
            f"--config.sft.eval_file={data['eval']}",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: config.sft.train_file: {bad}:2: no string field 'response' "
        "(records need 'prompt' and 'response', or 'messages')"
    )
    assert not os.path.exists(workdir / "checkpoints")


def test_checkpoint_generator_and_scorer_on_the_trained_model(data, trained):
    """The data tools' checkpoint adapters: CoT fusion runs on real checkpoints, and the likelihood
    judge's score of a record is minus its response cross-entropy as the SFT eval step computes it."""
    import jax
    import numpy as np

    from turbos_jax.data import sft as sft_data
    from turbos_jax.posttrain import cot_fusion, deliberate
    from turbos_jax.posttrain.generators import CheckpointGenerator
    from turbos_jax.step import loss_fn

    config = _config(data, 4)
    problems = cot_fusion.read_problems(data["eval"], "prompt", "answer")[:3]
    gen = CheckpointGenerator(config, trained, max_new_tokens=6, batch_size=2)
    fused = cot_fusion.fuse(problems, gen, gen, max_rounds=1)
    assert len(fused.records) + len(fused.unsolved) == 3
    assert all(len(u["attempts"]) == 2 for u in fused.unsolved)

    scorer = deliberate.CheckpointScorer(config, trained)
    record = {"prompt": problems[0]["prompt"], "response": problems[0]["response"]}
    score = scorer([record["prompt"]], [record["response"]])[0]
    example = sft_data.render(record, sft_data.make_format(config))
    feats = sft_data._features(example)
    n = len(feats["inputs"])
    batch = {
        "inputs": feats["inputs"][None],
        "targets": feats["targets"][None],
        "segment_ids": np.ones((1, n), np.int32),
        "positions": np.arange(n, dtype=np.int32)[None],
        "loss_mask": feats["loss_mask"][None],
    }
    _, (ce, _) = loss_fn(gen.params, gen.graphdef, jax.tree.map(jax.numpy.asarray, batch))
    assert score == pytest.approx(-float(ce), rel=1e-4)
    # Negative control: scoring the prompt's tokens too would give another value.
    batch["loss_mask"] = np.ones((1, n), np.float32)
    _, (ce_all, _) = loss_fn(gen.params, gen.graphdef, jax.tree.map(jax.numpy.asarray, batch))
    assert score != pytest.approx(-float(ce_all), rel=1e-3)


def test_resume_is_bitwise_identical_to_a_straight_run(data, tmp_path):
    """4 steps straight vs 2 steps, then the same command rerun to 4: the same step-4 checkpoint
    (the packed-data iterator and the optimizer are restored with the parameters)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    def params(workdir):
        state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "4", "state"))
        return jax.tree.leaves(state["params"])

    def config(total):
        c = _config(data, total)
        c.sft.eval_prompts, c.eval_every_steps = 0, 0  # training only
        return c

    sft.sft(config(4), str(tmp_path / "straight"))
    sft.sft(config(2), str(tmp_path / "resumed"))
    sft.sft(config(4), str(tmp_path / "resumed"))
    for a, b in zip(params(str(tmp_path / "straight")), params(str(tmp_path / "resumed")), strict=True):
        np.testing.assert_array_equal(a, b)
    # Negative control: the comparison sees a difference (another seed: init and data order).
    other = config(4)
    other.seed = 1
    sft.sft(other, str(tmp_path / "other"))
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(params(str(tmp_path / "straight")), params(str(tmp_path / "other")), strict=True)
    )
