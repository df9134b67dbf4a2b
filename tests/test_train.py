"""The trainer end to end on the tiny config: learning, resume after SIGKILL/SIGTERM, damaged
checkpoints, bad input and non-finite guards."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import ROOT, logged_losses, subprocess_env, wait_for_checkpoint

from configs import tiny
from turbos_jax import train
from turbos_jax.config import ConfigError
from turbos_jax.metrics import read_jsonl

SMALL = [
    "--config.batch_size=4",
    "--config.seq_len=64",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=10",
    "--config.eval_every_steps=0",
]


def _cmd(workdir, *extra, small=True):
    return [
        sys.executable,
        "-m",
        "turbos_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        *(SMALL if small else ()),
        *extra,
    ]


def _run(workdir, *extra, check=True, small=True):
    out = subprocess.run(
        _cmd(workdir, *extra, small=small),
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return out


def _start(workdir, *extra):
    return subprocess.Popen(
        _cmd(workdir, *extra),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _params(workdir, step):
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    import jax

    return jax.tree.leaves(state["params"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 20-step run, and a run killed with SIGKILL after step 10's checkpoint,
    resumed, then stopped with SIGTERM after step 20's checkpoint."""
    base = tmp_path_factory.mktemp("train")
    straight, broken = str(base / "straight"), str(base / "broken")
    _run(straight, "--config.total_steps=20")

    proc = _start(broken, "--config.total_steps=1000")
    wait_for_checkpoint(broken, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    proc = _start(broken, "--config.total_steps=1000")
    wait_for_checkpoint(broken, 20, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    return {"straight": straight, "broken": broken, "term_rc": proc.returncode, "term_out": stdout + stderr}


def test_resume_after_sigkill_is_bitwise_identical(runs):
    assert "resuming from checkpoint step 10" in runs["term_out"]
    a, b = _params(runs["straight"], 20), _params(runs["broken"], 20)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    la, lb = logged_losses(runs["straight"]), logged_losses(runs["broken"])
    assert [la[s] for s in range(1, 21)] == [lb[s] for s in range(1, 21)]


def test_sigterm_saves_and_exits_cleanly(runs):
    assert runs["term_rc"] == 0, runs["term_out"][-2000:]
    assert "SIGTERM: saved checkpoint at step" in runs["term_out"]
    steps = [int(d) for d in os.listdir(os.path.join(runs["broken"], "checkpoints")) if d.isdigit()]
    assert max(steps) >= 20


def test_damaged_latest_checkpoint_falls_back(runs, tmp_path):
    work = str(tmp_path / "w")
    import shutil

    shutil.copytree(runs["broken"], work)
    ckpts = os.path.join(work, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    latest, previous = steps[-1], steps[-2]
    # Damage every data file of the latest state (truncate), as a crash mid-copy would.
    for dirpath, _, files in os.walk(os.path.join(ckpts, str(latest), "state")):
        for f in files:
            if "manifest" in f or f.endswith(".data") or "d" == os.path.basename(dirpath):
                with open(os.path.join(dirpath, f), "r+b") as fh:
                    fh.truncate(0)
    out = _run(work, f"--config.total_steps={previous + 2}")
    assert f"checkpoint step {latest} is unreadable" in out.stdout
    assert f"resuming from checkpoint step {previous}" in out.stdout
    assert any(d.startswith(f"corrupt-{latest}-") for d in os.listdir(ckpts))  # kept, not deleted


def test_bad_inputs_give_one_line_errors(tmp_path):
    out = _run(str(tmp_path / "a"), "--config.total_steps=-5", check=False)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == ("error: config.total_steps=-5: must be a positive integer")
    out = _run(str(tmp_path / "c"), "--config.optim.bogus=1", check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --config.optim.bogus: the config has no key 'bogus'"
    )
    out = _run(str(tmp_path / "b"), "--config.data.sources.embedded=/no/such/file.jsonl", check=False)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and last.startswith("error: ") and "/no/such/file.jsonl" in last


def test_tiny_loss_falls(tmp_path):
    """The quickstart config, 100 steps on the bundled corpus."""
    _run(str(tmp_path), "--config.total_steps=100", "--config.eval_every_steps=100", small=False)
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["loss"] for r in rows if "loss" in r]
    first, last = losses[0], losses[-1]  # steps 10 and 100
    assert first > 4.0 and last < first - 1.5, losses
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 1 and evals[0] < 4.0
    assert all(r["tokens_per_sec"] > 0 for r in rows if "loss" in r)
    assert json.load(open(tmp_path / "config.json"))["total_steps"] == 100


def test_nonfinite_loss_stops_with_checkpoint_intact(tmp_path):
    config = tiny.get_config()
    config.batch_size, config.seq_len, config.total_steps = 8, 32, 8
    config.checkpoint_every_steps, config.eval_every_steps = 2, 0
    # Sane for two updates, then a learning rate that overflows the parameters.
    config.optim.schedule = (("constant", 2, 1e-3), ("constant", 10, 1e35))
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss at step"):
        train.train_and_evaluate(config, str(tmp_path))
    good = _params(str(tmp_path), 2)
    assert all(np.isfinite(p).all() for p in good)


def test_nonfinite_skip_mode_finishes(tmp_path):
    config = tiny.get_config()
    config.batch_size, config.seq_len, config.total_steps = 8, 32, 6
    config.checkpoint_every_steps, config.eval_every_steps, config.log_every_steps = 100, 0, 1
    config.optim.schedule = (("constant", 2, 1e-3), ("constant", 10, 1e35))
    config.on_nonfinite = "skip"
    train.train_and_evaluate(config, str(tmp_path))
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert rows[-1]["step"] == 6 and any(r.get("skipped_nonfinite") for r in rows)


def test_on_log_sees_every_metrics_row(tmp_path):
    """The notebook hook: every row metrics.jsonl gets (train and eval), in order, as written."""
    config = tiny.get_config()
    config.batch_size, config.seq_len, config.total_steps = 8, 32, 4
    config.model.layout = "AFMF"
    config.checkpoint_every_steps, config.eval_every_steps, config.log_every_steps = 100, 2, 1
    config.eval_batches = 1
    seen = []
    train.train_and_evaluate(config, str(tmp_path), on_log=lambda step, row: seen.append((step, row)))
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [step for step, _ in seen] == [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4]
    assert [row for _, row in seen] == rows
    assert [("eval_loss" in row) for _, row in seen] == [False, False, True, False, False, True]


def test_check_train_config_names_key():
    config = tiny.get_config()
    config.on_nonfinite = "ignore"
    with pytest.raises(ConfigError, match=r"^config\.on_nonfinite='ignore': expected"):
        train.train_and_evaluate(config, "/tmp/unused-turbos-workdir")
