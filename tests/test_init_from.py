"""config.init_from: a run without checkpoints starts from another workdir's newest checkpoint, or
from a parameters file (`convert --to_params`).

INIT_FULL (the next pre-training stage) takes parameters, optimizer state and step and counts on;
INIT_PARAMS (sft, rl) takes parameters only with a fresh optimizer at step 0. A resume wins over
init_from; a mismatch is one line naming the parameter, with nothing written in either workdir.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import ROOT, subprocess_env

from configs import tiny
from turbos_jax import convert, optim, params_file, train
from turbos_jax import training_loop as loop
from turbos_jax.checkpointing import IncompatibleCheckpointError, InitFromError, leaf_path
from turbos_jax.config import ConfigError, ModelConfig
from turbos_jax.data import make_train_iterator
from turbos_jax.generate import restore_params
from turbos_jax.interop import safetensors_io
from turbos_jax.metrics import read_jsonl
from turbos_jax.params_file import ParamsFileError

SOURCE_STEPS = 4


def _config(total_steps: int, init_from: str = ""):
    config = tiny.get_config()
    config.batch_size, config.seq_len, config.total_steps = 8, 32, total_steps  # 8 fake devices
    config.model.layout = "AFMF"
    config.log_every_steps, config.eval_every_steps = 1, 0
    config.checkpoint_every_steps = 2
    config.optim.schedule = (("warmup", 10, 1e-3),)  # a different LR at every step
    config.init_from = init_from
    return config


def _saved_state(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _leaves(tree) -> dict:
    return {leaf_path(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _listing(workdir) -> dict:
    """Every file under `workdir` with its size and modification time."""
    out = {}
    for base, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, workdir)] = (os.path.getsize(path), os.path.getmtime(path))
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 4-step pre-training run (checkpoints at 2 and 4)."""
    workdir = str(tmp_path_factory.mktemp("init_from") / "source")
    train.train_and_evaluate(_config(SOURCE_STEPS), workdir)
    return workdir


def _start(config, workdir, init):
    run = loop.prepare_run(config, workdir)
    it = make_train_iterator(config, process_index=run.shard, process_count=run.num_shards)
    start = loop.restore_or_init(run, it, init=init)
    start.ckpt.close()
    return start


def test_full_init_takes_params_optimizer_and_step(source, tmp_path):
    start = _start(_config(6, source), str(tmp_path / "stage2"), loop.INIT_FULL)
    saved = _leaves(_saved_state(source, SOURCE_STEPS))
    got = _leaves(jax.device_get(start.state))
    assert start.step == SOURCE_STEPS and int(start.state["step"]) == SOURCE_STEPS
    assert got.keys() == saved.keys()
    for path, value in saved.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    # Negative control: the same config without init_from starts elsewhere.
    fresh = _leaves(jax.device_get(_start(_config(6), str(tmp_path / "fresh"), loop.INIT_FULL).state))
    assert any(not np.array_equal(fresh[p], saved[p]) for p in saved if "params" in p)


def test_full_init_counts_on_and_writes_only_the_new_workdir(source, tmp_path):
    before = _listing(source)
    workdir = str(tmp_path / "stage2")
    config = _config(SOURCE_STEPS + 2, source)
    train.train_and_evaluate(config, workdir)
    rows = {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}
    assert sorted(rows) == [SOURCE_STEPS + 1, SOURCE_STEPS + 2]
    schedule = optim.make_schedule(config.optim.schedule)
    for step, row in rows.items():  # the LR schedule continues from the source's optimizer count
        assert row["learning_rate"] == pytest.approx(optim.learning_rate_at(schedule, step - 1), rel=1e-6)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(SOURCE_STEPS + 2)]
    assert int(_saved_state(workdir, SOURCE_STEPS + 2)["step"]) == SOURCE_STEPS + 2
    assert _listing(source) == before


def test_params_init_takes_params_only_with_a_fresh_optimizer(source, tmp_path):
    config = _config(6, source)
    config.optim.schedule = (("warmup", 3, 1e-4), ("constant", 3, 1e-4))  # the optimizer may differ
    start = _start(config, str(tmp_path / "sft"), loop.INIT_PARAMS)
    assert start.step == 0 and int(start.state["step"]) == 0
    saved = _leaves(_saved_state(source, SOURCE_STEPS)["params"])
    params = _leaves(jax.device_get(start.state["params"]))
    for path, value in saved.items():
        np.testing.assert_array_equal(params[path], value, err_msg=path)
    moments = [
        v for p, v in _leaves(jax.device_get(start.state["opt_state"])).items() if "/mu/" in p or "/nu/" in p
    ]
    assert moments and all(not v.any() for v in moments)  # Adam's moments start at zero
    source_moments = [
        v for p, v in _leaves(_saved_state(source, SOURCE_STEPS)["opt_state"]).items() if "/mu/" in p
    ]
    assert any(v.any() for v in source_moments)  # ... and the source's did not


def test_a_resume_wins_over_init_from(source, tmp_path):
    workdir = str(tmp_path / "own")
    train.train_and_evaluate(_config(2), workdir)  # its own checkpoint at step 2
    start = _start(_config(6, source), workdir, loop.INIT_FULL)
    assert start.step == 2
    own = _leaves(_saved_state(workdir, 2)["params"])
    got = _leaves(jax.device_get(start.state["params"]))
    for path, value in own.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)


@pytest.mark.parametrize("init", [loop.INIT_FULL, loop.INIT_PARAMS])
def test_mismatch_is_one_line_and_nothing_is_written(source, tmp_path, init):
    before = _listing(source)
    workdir = tmp_path / "bad"
    config = _config(6, source)
    config.model.d_model = 32
    with pytest.raises(IncompatibleCheckpointError) as err:
        _start(config, str(workdir), init)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("config.init_from: checkpoint step 4")
    assert "params/embed/embedding is (256, 64) float32 in the checkpoint, (256, 32) float32 here" in message
    assert "config.model.d_model: 64 in the checkpoint's config.json, 32 here" in message
    assert _listing(source) == before
    assert os.listdir(workdir) == []  # no checkpoints/, config.json or metrics.jsonl


def test_missing_source_and_exhausted_steps_are_one_line_errors(source, tmp_path):
    with pytest.raises(InitFromError, match=r"^config.init_from: no checkpoint in .*nowhere/checkpoints$"):
        _start(_config(6, str(tmp_path / "nowhere")), str(tmp_path / "a"), loop.INIT_FULL)
    with pytest.raises(
        ConfigError, match=r"^config.total_steps=4: must exceed step 4 of the config.init_from"
    ):
        _start(_config(SOURCE_STEPS, source), str(tmp_path / "b"), loop.INIT_FULL)
    config = _config(6, source)
    config.init_from = None
    with pytest.raises(ConfigError, match=r"^config.init_from=None: expected a workdir path"):
        _start(config, str(tmp_path / "c"), loop.INIT_FULL)


# ------------------------------------------------------------------ parameters files (params_file.py)
@pytest.fixture(scope="module")
def params_file_of_source(source, tmp_path_factory):
    """`convert --to_params` of the source run's newest checkpoint (step 4)."""
    path = str(tmp_path_factory.mktemp("params") / "source.safetensors")
    assert convert.to_params(source, path) == sum(
        v.size for v in _leaves(_saved_state(source, 4)["params"]).values()
    )
    return path


@pytest.mark.parametrize("init", [loop.INIT_FULL, loop.INIT_PARAMS])
def test_params_file_starts_any_command_with_those_params_at_step_0(
    source, params_file_of_source, tmp_path, init
):
    start = _start(_config(6, params_file_of_source), str(tmp_path / "w"), init)
    assert start.step == 0 and int(start.state["step"]) == 0  # a file has no optimizer state to count on
    saved = _leaves(_saved_state(source, SOURCE_STEPS)["params"])
    got = _leaves(jax.device_get(start.state["params"]))
    assert got.keys() == saved.keys()
    for path, value in saved.items():  # placed on the 8-device mesh, bit for bit
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    moments = [v for p, v in _leaves(jax.device_get(start.state["opt_state"])).items() if "/mu/" in p]
    assert moments and all(not v.any() for v in moments)
    # generate (and every sampler built on restore_params) reads the same file onto one device.
    model_cfg = ModelConfig.from_config(_config(6).model)
    _, params, step = restore_params(model_cfg, params_file_of_source)
    assert step == SOURCE_STEPS
    for path, value in _leaves(jax.device_get(params)).items():
        np.testing.assert_array_equal(value, saved[path], err_msg=path)


def test_params_file_mismatch_and_bad_files_are_one_line_errors(source, params_file_of_source, tmp_path):
    before = _listing(os.path.dirname(params_file_of_source))
    workdir = tmp_path / "bad"
    config = _config(6, params_file_of_source)
    config.model.d_model = 32
    with pytest.raises(ParamsFileError) as err:
        _start(config, str(workdir), loop.INIT_PARAMS)
    message = str(err.value)
    assert "\n" not in message and message.startswith(params_file_of_source)
    assert "embed/embedding is (256, 64) float32 in the file, (256, 32) float32 here" in message
    assert "config.model.d_model: 64 in the file's config, 32 here" in message
    assert os.listdir(workdir) == [] and _listing(os.path.dirname(params_file_of_source)) == before

    foreign = str(tmp_path / "model.safetensors")  # a safetensors file from elsewhere (no turbos metadata)
    safetensors_io.write_file(foreign, [("w", np.ones((2, 2), np.float32))])
    for path, pattern in [
        (foreign, r"model.safetensors: not a turbos-jax parameters file \(metadata format 'pt'"),
        (str(tmp_path / "missing.safetensors"), r"missing.safetensors: no such parameters file$"),
    ]:
        with pytest.raises(ParamsFileError, match=pattern):
            _start(_config(6, path), str(tmp_path / "w2"), loop.INIT_PARAMS)
    with pytest.raises(convert.ConvertError, match="already exists"):
        convert.to_params(source, params_file_of_source)  # never overwritten
    with pytest.raises(convert.ConvertError, match=r"expected a file name ending in \.safetensors"):
        convert.to_params(source, str(tmp_path / "params.bin"))
    assert _listing(os.path.dirname(params_file_of_source)) == before


def test_convert_cli_writes_a_params_file_and_refuses_bad_flags(source, tmp_path):
    def convert_cli(*flags):
        return subprocess.run(
            [sys.executable, "-m", "turbos_jax.convert", f"--workdir={source}", *flags],
            capture_output=True,
            text=True,
            env=subprocess_env(devices=1),
            cwd=ROOT,
            timeout=300,
        )

    path = tmp_path / "p.safetensors"
    refused = convert_cli(f"--to_params={path}", "--dtype=bfloat16")
    assert refused.returncode != 0 and "--dtype applies to --to_hf only" in refused.stderr
    assert not path.exists()
    done = convert_cli(f"--to_params={path}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"parameters of {source} to {path}")
    assert params_file.read_step(str(path)) == SOURCE_STEPS
    again = convert_cli(f"--to_params={path}")
    assert again.returncode == 1
    last_line = again.stderr.strip().splitlines()[-1]
    assert last_line == f"error: --to_params={path}: already exists; choose a new file name"
