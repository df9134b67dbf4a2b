r"""Converts Hugging Face hybrid checkpoints to turbos-jax workdirs and back (docs/interop.md):

    python -m turbos_jax.convert --from_hf=/path/to/hf_model --workdir=/tmp/granite
    python -m turbos_jax.convert --to_hf=/tmp/granite_hf --workdir=/tmp/granite [--dtype=bfloat16]
    python -m turbos_jax.convert --to_params=/tmp/sft.safetensors --workdir=/tmp/turbos-sft

--from_hf writes a normal trainer workdir: `config.json` (the full train config `interop.hf.load`
derives, with the source config.json inside as `hf_config`), `config.py` (loads that JSON, so
`--config=WORKDIR/config.py --config.model.dtype=bfloat16` works with train, sft and generate), and
`checkpoints/0/` holding {params, a fresh optimizer state, step 0} and the data iterator, written by
the trainer's own `Checkpointer`. It refuses a workdir that already holds checkpoints.
--to_hf reads the newest checkpoint's parameters and writes safetensors shards + config.json
(+ tokenizer.json when the config names one).
--to_params writes the newest checkpoint's parameters and the workdir's config into one turbos-jax
parameters file (turbos_jax/params_file.py), which `--config.init_from=FILE` (train, sft, rl) and
`generate --workdir=FILE` read: any architecture, no optimizer state.
Mistakes (unsupported checkpoint, bad flags, occupied workdir) end in one `error: ...` line.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from turbos_jax import cli, sharding
from turbos_jax import workdir as run_dir
from turbos_jax.checkpointing import Checkpointer
from turbos_jax.config import ModelConfig
from turbos_jax.data import DataError
from turbos_jax.interop.hf_config import UnsupportedCheckpointError

# absl flags, defined by define_flags() (not on import)
_FROM_HF = _TO_HF = _TO_PARAMS = _WORKDIR = _DTYPE = None

CONFIG_LOADER = '''"""The train config of a converted workdir: the config.json next to this file."""

import json
import os

import ml_collections


def get_config():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))
'''


def define_flags() -> None:
    global _FROM_HF, _TO_HF, _TO_PARAMS, _WORKDIR, _DTYPE
    if _WORKDIR is not None:
        return
    _FROM_HF = flags.DEFINE_string("from_hf", None, "HF checkpoint directory to import.")
    _TO_HF = flags.DEFINE_string("to_hf", None, "Directory to export an HF checkpoint into.")
    _TO_PARAMS = flags.DEFINE_string(
        "to_params", None, "turbos-jax parameters file (*.safetensors) to write."
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "turbos-jax workdir (written by --from_hf).")
    _DTYPE = flags.DEFINE_string("dtype", None, "--to_hf tensor dtype (default: the source's).")


class ConvertError(cli.UserError):
    """Bad convert input: occupied or empty workdir, bad flags."""


def from_hf(hf_dir: str, workdir: str) -> int:
    """Imports `hf_dir` into a new trainer workdir; returns the number of parameters."""
    from turbos_jax.data import make_train_iterator
    from turbos_jax.interop import hf
    from turbos_jax.step import train_setup

    config = hf.train_config(hf.read_hf_config(hf_dir), hf_dir)  # a bad --from_hf creates nothing
    workdir = run_dir.prepare(workdir)
    directory = os.path.join(workdir, "checkpoints")
    if os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory)):
        raise ConvertError(f"--workdir={workdir}: already holds checkpoints; use a new directory")
    model_cfg = ModelConfig.from_config(config.model)
    mesh = sharding.train_mesh(config, model_cfg)
    data_iterator = make_train_iterator(config)  # a bad tokenizer stops here, before any write
    with jax.set_mesh(mesh):
        _, model = hf.load(hf_dir, mesh, config)
        params = nnx.state(model)
        tx = train_setup(config, model_cfg).tx
        opt_state = jax.jit(tx.init)(params)
        state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
        ckpt = Checkpointer(directory, keep=config.keep_checkpoints, async_save=False)
        try:
            ckpt.save(0, state, data_iterator)
            ckpt.wait()
        finally:
            ckpt.close()
    run_dir.write_config(workdir, config)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.py"), "w") as f:
            f.write(CONFIG_LOADER)
    return sum(x.size for x in jax.tree.leaves(params))


def read_workdir_config(workdir: str):
    """The ConfigDict a converted (or trained) workdir's config.json holds."""
    import ml_collections

    saved = run_dir.saved_config(workdir)
    if saved is None:
        raise ConvertError(f"--workdir={workdir}: no readable {run_dir.CONFIG_FILE}")
    return ml_collections.ConfigDict(saved)


def to_hf(workdir: str, out_dir: str, dtype: str | None = None) -> list[str]:
    """Exports the newest checkpoint of `workdir` to `out_dir`; returns the files written."""
    from turbos_jax.generate import restore_params
    from turbos_jax.interop import hf

    config = read_workdir_config(workdir)
    model_cfg = ModelConfig.from_config(config.model)
    _, params, _ = restore_params(model_cfg, workdir)
    files = hf.export(config, params, out_dir, dtype)
    tokenizer = str(config.data.tokenizer)
    if tokenizer.endswith(".json") and os.path.isfile(tokenizer):
        shutil.copy(tokenizer, os.path.join(out_dir, "tokenizer.json"))
        files.append("tokenizer.json")
    return files


def to_params(workdir: str, path: str) -> int:
    """Writes the newest checkpoint of `workdir` as a parameters file at `path`; returns the number
    of parameters. An existing file is refused (nothing is overwritten)."""
    from turbos_jax import params_file
    from turbos_jax.generate import restore_params

    if not params_file.is_params_file(path):
        raise ConvertError(f"--to_params={path}: expected a file name ending in {params_file.SUFFIX}")
    if os.path.exists(path):
        raise ConvertError(f"--to_params={path}: already exists; choose a new file name")
    config = read_workdir_config(workdir)
    _, params, step = restore_params(ModelConfig.from_config(config.model), workdir, config)
    return params_file.save(path, params, config, step)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    targets = [f for f in (_FROM_HF, _TO_HF, _TO_PARAMS) if f.value]
    if not _WORKDIR.value or len(targets) != 1:
        raise app.UsageError(
            "--workdir and exactly one of --from_hf=DIR, --to_hf=DIR or --to_params=FILE are required"
        )
    if _DTYPE.value and not _TO_HF.value:
        raise app.UsageError("--dtype applies to --to_hf only (--to_params keeps the checkpoint's dtypes)")
    if _TO_PARAMS.value:
        n = to_params(_WORKDIR.value, _TO_PARAMS.value)
        print(f"wrote {n:,} parameters of {_WORKDIR.value} to {_TO_PARAMS.value}", flush=True)
    elif _FROM_HF.value:
        n = from_hf(_FROM_HF.value, _WORKDIR.value)
        print(f"imported {n:,} parameters into {_WORKDIR.value} (checkpoint step 0)", flush=True)
    else:
        files = to_hf(_WORKDIR.value, _TO_HF.value, _DTYPE.value)
        print(f"exported {len(files)} files to {_TO_HF.value}: {', '.join(files)}", flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main, ConvertError, UnsupportedCheckpointError, DataError)
