r"""Samples a continuation from a trained checkpoint:

    python -m turbos_jax.generate --config=configs/tiny.py --workdir=/tmp/turbos-tiny \
        --prompt="Once upon a time" --max_new_tokens=64 --temperature=0.8 --top_p=0.95 --seed=0 \
        [--prefill_chunk=4096]

1. `config.model` gives the architecture; the model is built abstractly (`nnx.eval_shape`).
2. Only the "params" subtree of the newest step in WORKDIR/checkpoints/<step>/state is restored
   (Orbax partial restore into those abstract shapes, on one device; the optimizer state is never
   read); a parameters file (`--workdir=FILE.safetensors`, turbos_jax/params_file.py) is read
   whole instead. --int8 quantises the matmul weights for sampling (generation/quantize.py).
3. The prompt is tokenized with `config.data.tokenizer` (and prefilled --prefill_chunk tokens at a
   time when set). Generation stops at the stop token or after --max_new_tokens, and the decoded
   continuation, without the stop token, is printed. The stop token is --stop_text (one token);
   without the flag, `config.sft.stop_text` when the config has an `sft` section and it is not
   empty (what SFT taught the model to end a response with: "\n" in configs/sft_tiny.py), else
   the tokenizer's EOS (the bytes tokenizer has none: --max_new_tokens then ends it).
Mistakes (no checkpoint, bad flags or config keys) end in one `error: ...` line.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from turbos_jax import cli, compile_cache, params_file
from turbos_jax.config import ModelConfig
from turbos_jax.data import DataError, load_tokenizer
from turbos_jax.generation.api import generate
from turbos_jax.generation.quantize import quantize_params
from turbos_jax.generation.sampling import SamplingParams

# absl flags, defined by define_flags() (not on import).
_CONFIG = _WORKDIR = _PROMPT = _MAX_NEW = _TEMPERATURE = _TOP_K = _TOP_P = _MIN_P = _SEED = _INT8 = None
_PREFILL_CHUNK = _STOP_TEXT = None


def define_flags() -> None:
    """This command's absl flags, defined when it runs as `python -m turbos_jax.generate`: importing
    the module (e.g. for `restore_params`, next to `turbos_jax.train`) defines none."""
    global _CONFIG, _WORKDIR, _PROMPT, _MAX_NEW, _TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _SEED, _INT8
    global _PREFILL_CHUNK, _STOP_TEXT
    if _CONFIG is not None:
        return
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    _WORKDIR = flags.DEFINE_string(
        "workdir", None, "Training workdir holding checkpoints/, or a parameters file (*.safetensors)."
    )
    _PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
    _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
    _TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    _TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
    _TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
    _MIN_P = flags.DEFINE_float("min_p", 0.0, "Keep tokens with p >= min_p * max p (0 = off).")
    _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
    _INT8 = flags.DEFINE_bool("int8", False, "Int8 weight-only quantisation of matmul weights.")
    _PREFILL_CHUNK = flags.DEFINE_integer(
        "prefill_chunk", 0, "Prefill the prompt this many tokens at a time (bounded memory); 0 = at once."
    )
    _STOP_TEXT = flags.DEFINE_string(
        "stop_text",
        None,
        "Stop after this text (one token; '' = the tokenizer's EOS). Default: config.sft.stop_text "
        "when set, else the EOS.",
    )


class GenerateError(cli.UserError):
    """Bad generation input: missing checkpoint, bad flag value."""


def restore_params(model_cfg: ModelConfig, workdir: str, config=None):
    """(graphdef, params, step) from the newest checkpoint's "params" subtree, on the default
    device; `workdir` may also be a parameters file (turbos_jax/params_file.py), whose mismatch
    error names the `config.model` key behind it when the train `config` is given."""
    import orbax.checkpoint as ocp

    from turbos_jax.model import TurbosModel

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TurbosModel(model_cfg, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    if params_file.is_params_file(workdir):
        params = params_file.load(workdir, abstract, config)
        return graphdef, params, params_file.read_step(workdir)
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    steps = []
    if os.path.isdir(directory):
        steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    if not steps:
        raise GenerateError(
            f"--workdir={workdir}: no checkpoint in {directory} (train first: "
            "python -m turbos_jax.train --config=... --workdir=...)"
        )
    manager = ocp.CheckpointManager(directory, item_names=("state",))
    try:
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=device), abstract)
        restored = manager.restore(
            steps[-1],
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    {"params": abstract}, restore_args={"params": restore_args}, partial_restore=True
                )
            ),
        )
    except Exception as e:  # noqa: BLE001 - any failure is reported in one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise GenerateError(
            f"checkpoint step {steps[-1]} in {directory} could not be restored "
            f"into config.model's shapes: {first}"
        ) from None
    finally:
        manager.close()
    return graphdef, restored["state"]["params"], steps[-1]


def stop_token(config, tokenizer, stop_text: str | None) -> int | None:
    """The token generation stops at (module docstring, step 3); None when there is none."""
    where = "--stop_text"
    if stop_text is None and "sft" in config and config.sft.stop_text:
        stop_text, where = config.sft.stop_text, "config.sft.stop_text"
    if not stop_text:
        return tokenizer.eos_id
    ids = tokenizer.encode(stop_text)
    if len(ids) != 1:
        raise GenerateError(f"{where}={stop_text!r}: must be one token of the tokenizer, is {len(ids)}")
    return ids[0]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if _CONFIG.value is None or not _WORKDIR.value or _PROMPT.value is None:
        raise app.UsageError(
            "--config, --workdir and --prompt are required, e.g. "
            "--config=configs/tiny.py --workdir=/tmp/tiny --prompt='Hello'"
        )
    if _MAX_NEW.value < 1:
        raise GenerateError(f"--max_new_tokens={_MAX_NEW.value}: must be >= 1")
    if _PREFILL_CHUNK.value < 0:
        raise GenerateError(f"--prefill_chunk={_PREFILL_CHUNK.value}: must be >= 0 (0 = whole prompt)")
    try:
        sampling = SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MIN_P.value)
    except ValueError as e:
        raise GenerateError(f"--{e}") from None
    config = _CONFIG.value
    compile_cache.enable(config.compilation_cache_dir)  # before the first compile
    model_cfg = ModelConfig.from_config(config.model)
    tokenizer = load_tokenizer(config.data.tokenizer)
    ids = tokenizer.encode(_PROMPT.value)
    if not ids:
        raise GenerateError("--prompt: empty after tokenization")
    if max(ids) >= model_cfg.vocab_size:
        raise GenerateError(f"--prompt: token id {max(ids)} >= config.model.vocab_size")
    stop_id = stop_token(config, tokenizer, _STOP_TEXT.value)
    graphdef, params, step = restore_params(model_cfg, _WORKDIR.value, config)
    if _INT8.value:
        params = quantize_params(params)
    tokens, n = generate(
        graphdef,
        params,
        [ids],
        [len(ids)],
        max_new_tokens=_MAX_NEW.value,
        sampling=sampling,
        rng=jax.random.key(_SEED.value),
        eos_id=stop_id,
        prefill_chunk=_PREFILL_CHUNK.value or None,
    )
    out = [int(t) for t in jax.device_get(tokens)[0, : int(n[0])]]
    if stop_id is not None and out and out[-1] == stop_id:
        out = out[:-1]
    print(f"[checkpoint step {step}] {_PROMPT.value}", end="", flush=True)
    print(tokenizer.decode(out), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main, DataError, GenerateError)
