"""`turbos_jax.rl` end to end at tiny shapes on 8 fake devices: policy and reference from
config.init_from, evaluation rows at step 0 and every eval, two phases, a run stopped half way
(by the command line) that resumes to the same parameters as an uninterrupted one, the command as
a 2-process job equal to the 1-process run, and a code source (sandbox-scored) mixed with an
answer source, whose broken records are counted, not fatal."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT, subprocess_env

from turbos_jax import sharding
from turbos_jax.checkpointing import Checkpointer
from turbos_jax.config import ModelConfig
from turbos_jax.metrics import read_jsonl
from turbos_jax.posttrain import arithmetic
from turbos_jax.posttrain.prompts import PromptStream
from turbos_jax.rl import rl
from turbos_jax.step import build_train_program

STEPS = 4


# The test's config file: the same text runs in this process and on the command line.
CONFIG_TEMPLATE = """
import os
import sys

from configs import grpo_tiny

DATA, INIT_FROM, TOTAL_STEPS = {data!r}, {init_from!r}, {total_steps!r}
sys.path.insert(0, os.path.dirname(__file__))  # toy_reward.py, next to this file


def get_config():
    config = grpo_tiny.get_config()
    config.model.layout = "AFMF"
    config.total_steps = TOTAL_STEPS
    config.batch_size, config.seq_len = 8, 8 + 8 - 1  # 4 prompts x G = 2, prompt 8 + 8 new tokens
    config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 1, 2, 2
    config.sft.eval_file, config.sft.eval_prompts, config.sft.eval_batch_size = DATA["eval"], 4, 4
    config.init_from = INIT_FROM
    r = config.rl
    r.num_generations, r.max_prompt_len, r.max_new_tokens = 2, 8, 8
    r.sources = {{"math": ("answer", DATA["rl"]), "general": ("answer", DATA["rl"])}}
    r.phases = ((2, 0.0, {{"math": 1.0}}), ({steps}, 0.05, {{"math": 0.5, "general": 0.5}}))
    r.max_gen_batches = 2
    # A random-init policy never answers correctly: a model-based reward (the pluggable kind)
    # that likes even first bytes gives groups reward spread, so the policy updates.
    r.reward_model, r.reward_model_weight = "toy_reward:first_byte_even", 1.0
    return config
"""
TOY_REWARD = """
import jax


def first_byte_even(prompts, completions, records):
    return [float(len(c) > 0 and ord(c[0]) % 2 == 0) for c in completions]


def first_byte_even_on_process_0(prompts, completions, records):
    # A reward that differs between hosts (as a sandbox's timeouts or a remote model can):
    # process 1 scores the opposite.
    even = first_byte_even(prompts, completions, records)
    return even if jax.process_index() == 0 else [1.0 - r for r in even]
"""


def _config_file(path, data, init_from, total_steps=STEPS) -> str:
    (path.parent / "toy_reward.py").write_text(TOY_REWARD)
    path.write_text(
        CONFIG_TEMPLATE.format(data=data, init_from=init_from, total_steps=total_steps, steps=STEPS)
    )
    return str(path)


def _config(*args, **kwargs):
    return runpy.run_path(_config_file(*args, **kwargs))["get_config"]()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith")
    return arithmetic.write_task_files(
        str(out), num_train=0, num_eval=8, num_rl=40, seed=0, levels=(1,), operations=("add",)
    )


@pytest.fixture(scope="module")
def sft_workdir(data, tmp_path_factory):
    """A checkpoint of freshly initialised parameters standing in for an SFT run."""
    config = _config(tmp_path_factory.mktemp("cfg") / "c.py", data, "")
    model_cfg = ModelConfig.from_config(config.model)
    mesh = sharding.train_mesh(config, model_cfg)
    program = build_train_program(config, model_cfg, mesh)
    workdir = str(tmp_path_factory.mktemp("sft"))
    with jax.set_mesh(mesh):
        state = jax.jit(program.setup.init_state, out_shardings=program.state_shardings)()
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
        ckpt.save(7, state, PromptStream({"x": [{"prompt": "p"}]}, seed=0))
        ckpt.close()
    return workdir


def _params(workdir, step):
    from orbax.checkpoint import PyTreeCheckpointer

    tree = PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return tree


@pytest.fixture(scope="module")
def straight(data, sft_workdir, tmp_path_factory):
    """An uninterrupted STEPS-step run in this process (8 devices): the reference of the resume
    and multi-process tests."""
    out = tmp_path_factory.mktemp("straight")
    rl(_config(out / "straight.py", data, sft_workdir), str(out / "w"))
    return str(out / "w")


def test_runs_evaluates_and_resumes_exactly(straight, data, sft_workdir, tmp_path):
    rows = read_jsonl(os.path.join(straight, "metrics.jsonl"))
    evals = {r["step"]: r for r in rows if "eval_exact_match" in r}
    assert sorted(evals) == [0, 2, 4] and all(0 <= r["eval_exact_match"] <= 1 for r in evals.values())
    train = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train) == [1, 2, 3, 4]
    assert [train[s]["beta"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 0.05, 0.05]  # two phases
    for row in train.values():
        for key in ("pg_loss", "kl", "bon_nll", "reward/correct", "frac_zero_std", "num_gen_batches"):
            assert np.isfinite(row[key]), key
    final = _params(straight, STEPS)
    init = _params(sft_workdir, 7)
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
    # The reference is the init_from parameters, frozen; the policy moved away from it (when a
    # step had any group with reward spread, which random-init sampling with 2 rounds gives).
    for ref, start in zip(leaves(final["reference"]), leaves(init["params"]), strict=True):
        np.testing.assert_array_equal(ref, start)
    assert (
        sum(r["updated"] for r in train.values()) >= 2 and max(r["reward/model"] for r in train.values()) > 0
    )
    assert any(
        not np.array_equal(a, b) for a, b in zip(leaves(final["params"]), leaves(init["params"]), strict=True)
    )

    # The command line, stopped after 2 steps, then resumed: the same parameters as straight.
    resumed = str(tmp_path / "resumed")
    cfg_file = _config_file(tmp_path / "half.py", data, sft_workdir, total_steps=2)
    cmd = [sys.executable, "-m", "turbos_jax.rl", f"--config={cfg_file}", f"--workdir={resumed}"]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=subprocess_env(devices=8, fast_compile=True),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
    rl(_config(tmp_path / "rest.py", data, sft_workdir), resumed)
    again = _params(resumed, STEPS)
    for a, b in zip(leaves(again), leaves(final), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_two_processes_equal_one(straight, data, sft_workdir, tmp_path):
    """The command as a 2-process job (2 x 4 fake devices, the same 8-device mesh as `straight`):
    every process builds the same global batch, so losses and final parameters equal the
    1-process run's. Process 1's reward disagrees with process 0's: the batch takes process 0's
    (verified: without grpo.process_zero_values the parameters differ by ~1e-4 and the loss
    check fails)."""
    from test_multihost import _restore_state, _run_job

    workdir = str(tmp_path / "two")
    cfg_file = _config_file(tmp_path / "two.py", data, sft_workdir)
    cmd = [sys.executable, "-m", "turbos_jax.rl", f"--config={cfg_file}", f"--workdir={workdir}"]
    cmd += ["--config.rl.reward_model=toy_reward:first_byte_even_on_process_0"]
    results = _run_job(cmd + ["--config.sft.eval_prompts=0"], devices=4)  # no eval: compile less
    assert "process 1/2, local devices 4 (cpu), global devices 8" in results[1].stdout
    rows = lambda w: {r["step"]: r for r in read_jsonl(os.path.join(w, "metrics.jsonl")) if "loss" in r}
    one, two = rows(straight), rows(workdir)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("reward/model", "frac_zero_std", "num_gen_batches", "response_tokens"):
            assert two[step][key] == one[step][key], (step, key)
        for key in ("loss", "kl", "bon_nll", "entropy", "grad_norm"):
            # atol: kl is ~3e-5 here, a difference of nearly equal log-probs, so float32 rounding in
            # another reduction order moves it by ~2e-9 (6e-5 relative); every other key by < 1e-5.
            np.testing.assert_allclose(two[step][key], one[step][key], rtol=1e-5, atol=1e-8, err_msg=key)
    state = lambda w: _restore_state(os.path.join(w, "checkpoints", str(STEPS), "state"))
    flat = lambda w: np.concatenate([np.ravel(x) for x in jax.tree.leaves(state(w)["params"])])
    # Measured: max |diff| 3e-7 (reductions in another order across processes).
    assert np.abs(flat(workdir) - flat(straight)).max() < 1e-5


# Code records for a random-init policy, whose responses are garbage: a test it never passes, a
# test snippet that kills the sandbox's child (no verdict), and one that does not compile.
CODE_RECORDS = [
    {"prompt": "def f", "tests": ["assert f() == 1"]},
    {"prompt": "def g", "tests": ["import os; os._exit(0)"]},
    {"prompt": "def h", "tests": ["assert h( =="]},
]
CODE_SUFFIX = """
_answers_only = get_config


def get_config():  # the answer source mixed with a code source, 2 steps
    config = _answers_only()
    config.total_steps = 2
    config.rl.sources = {{"math": ("answer", DATA["rl"]), "code": ("code", {code!r})}}
    config.rl.phases = ((2, 0.05, {{"math": 1.0, "code": 2.0}}),)
    return config
"""


def test_code_prompts_mixed_with_answers(data, sft_workdir, tmp_path):
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps(r) + "\n" for r in CODE_RECORDS))
    cfg_file = tmp_path / "code_cfg.py"
    _config_file(cfg_file, data, sft_workdir, total_steps=2)
    cfg_file.write_text(cfg_file.read_text() + CODE_SUFFIX.format(code=str(code)))

    workdir = str(tmp_path / "mixed")
    rl(runpy.run_path(str(cfg_file))["get_config"](), workdir)
    train = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    coded = [r for r in train if "reward/correct/code" in r]
    assert coded, "no code prompt was drawn"
    # Garbage code passes no test; the crashing and unparsable records are counted failures
    # (scored 0), and they fail only their own rows: the answer rows have none.
    assert all(r["reward/correct/code"] == 0.0 for r in coded)
    assert sum(r.get("reward_failures/correct/code", 0) for r in train) > 0
    assert all(r.get("reward_failures/correct/math", 0) == 0 for r in train)
    assert all(r["reward_failures/correct"] == r.get("reward_failures/correct/code", 0) for r in train)

    # The command line: the same run, the same rewards.
    cli_workdir = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "turbos_jax.rl", f"--config={cfg_file}", f"--workdir={cli_workdir}"]
    env = subprocess_env(devices=8, fast_compile=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli_train = [r for r in read_jsonl(os.path.join(cli_workdir, "metrics.jsonl")) if "loss" in r]
    rewards = lambda rows: [{k: v for k, v in r.items() if k.startswith("reward")} for r in rows]
    assert rewards(cli_train) == rewards(train)


def test_bad_config_is_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "w"
    cmd = [
        sys.executable,
        "-m",
        "turbos_jax.rl",
        "--config=configs/grpo_tiny.py",
        f"--workdir={workdir}",
        "--config.rl.num_generations=1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config.rl.num_generations=1: GRPO needs at least 2" in proc.stderr.strip().splitlines()[-1]
    assert not os.path.exists(workdir / "checkpoints")


def test_prompt_filter_command(data, sft_workdir, tmp_path):
    """The filter command's path (config, init_from restore, SFT template, rollouts, verifier,
    output): a random-init policy never answers correctly, so every rate is 0 and nothing is kept.
    Rates against hand-checked responses: tests/test_grpo_rollouts.py."""
    from turbos_jax.posttrain.prompt_filter import filter_prompts

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(open(data["rl"]).readlines()[:8]))
    out = tmp_path / "kept.jsonl"
    config = _config(tmp_path / "f.py", data, sft_workdir)
    with config.unlocked():
        config.rl.reward_model = ""
    kwargs = dict(kind="answer", k=2, batch_prompts=4, low=0.0, high=1.0)
    rates = filter_prompts(config, init_from=sft_workdir, prompts=str(prompts), out=str(out), **kwargs)
    assert rates.tolist() == [0.0] * 8 and out.read_text() == ""
