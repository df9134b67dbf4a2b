"""`python -m turbos_jax.convert`: an HF checkpoint -> a trainer workdir -> back, bit-exact."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, max_rel_err, subprocess_env

from turbos_jax import convert
from turbos_jax.config import ModelConfig
from turbos_jax.generate import restore_params
from turbos_jax.interop.safetensors_io import TensorReader

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf", "mamba2")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The Mamba2 fixture (few leaves: an Orbax save compiles per leaf) plus a word-level
    tokenizer.json over its 96 ids (the data iterator the workdir's checkpoint holds needs a
    tokenizer that fits the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("hf") / "mamba2"
    shutil.copytree(FIXTURE, path)
    vocab = {f"t{i}": i for i in range(90)} | {"[UNK]": 90}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_from_hf_workdir_restores_and_exports_bit_exact(hf_dir, tmp_path):
    workdir, out = tmp_path / "work", tmp_path / "back"
    source = TensorReader(FIXTURE)
    hf_count = sum(int(np.prod(source.shape(k))) for k in source.keys())
    assert convert.from_hf(str(hf_dir), str(workdir)) == hf_count + 2 * (128 - 96) * 32  # + padded rows
    assert sorted(os.listdir(workdir / "checkpoints")) == ["0"]
    config = convert.read_workdir_config(str(workdir))
    graphdef, params, step = restore_params(ModelConfig.from_config(config.model), str(workdir))
    assert step == 0
    ref = np.load(os.path.join(FIXTURE, "ref.npz"))
    logits = np.asarray(nnx.merge(graphdef, params)(ref["tokens"])[0])[..., :96]
    assert max_rel_err(logits, ref["logits"]) < 1e-4

    files = convert.to_hf(str(workdir), str(out))
    assert "tokenizer.json" in files
    back = TensorReader(str(out))
    assert back.keys() == source.keys()
    assert all(np.array_equal(source.read(k), back.read(k)) for k in source.keys())
    assert json.load(open(out / "config.json")) == json.load(open(os.path.join(FIXTURE, "config.json")))


def test_cli_refuses_an_occupied_workdir_in_one_line(hf_dir, tmp_path):
    (tmp_path / "checkpoints" / "7").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "turbos_jax.convert", f"--from_hf={hf_dir}", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        env=subprocess_env(devices=1),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: --workdir={tmp_path}: already holds checkpoints; use a new directory"
    )
    assert os.listdir(tmp_path / "checkpoints") == ["7"]
