# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Import a Hugging Face hybrid, check it against PyTorch, fine-tune it, export it back
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/turbos-jax/turbos-jax/blob/main/notebooks/04_hf_import.ipynb)
#
# `turbos_jax.interop.hf` reads Granite-4.0-H, Nemotron-H, Hunyuan-A13B and Mamba2 checkpoints
# from their safetensors files (docs/interop.md). This notebook loads one, shows the config and
# layer layout it maps to, compares its logits and greedy tokens with PyTorch's, converts it into a
# trainer workdir, fine-tunes it for a few steps with a live loss plot, and exports it back to
# Hugging Face format, checking that the round trip is exact.
#
# Which checkpoint:
# - **In Colab**: `ibm-granite/granite-4.0-h-350m` from the Hub (about 340M parameters: 28 Mamba2
#   and 4 attention layers, each followed by a dense SwiGLU MLP; a 0.7 GB bf16 download, 1.4 GB in
#   fp32). The PyTorch reference is computed in the notebook with `transformers`, which Colab
#   ships. Use a GPU runtime (a T4 is enough); on a CPU runtime every step takes tens of seconds.
# - **Everywhere else, and in the tests**: the tiny Granite-4.0-H fixture committed in the
#   repository (`tests/fixtures/hf/granite`: Mamba2 + attention + MoE with a shared expert, muP
#   scalars, tied embeddings), with the logits and greedy tokens PyTorch produced for it saved
#   beside it. Nothing is downloaded. This needs a checkout; any CPU runs it in a few minutes.
#
# `TURBOS_NOTEBOOK_SMOKE=1` (set by the tests) always uses the fixture and trains 8 steps.

# %%
# Colab only: install turbos-jax from its repository, with the jax / flax versions its CI tests
# (elsewhere: `pip install -e ".[notebooks]"` in a checkout).
import importlib.util
import os
import shutil
import subprocess
import sys

REPO = "https://github.com/turbos-jax/turbos-jax"
if "google.colab" in sys.modules and importlib.util.find_spec("turbos_jax") is None:
    on_tpu = os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio")
    jax_pin = "jax[cuda12]" if shutil.which("nvidia-smi") else "jax[tpu]" if on_tpu else "jax"
    pins = [f"{jax_pin}==0.10.2", "flax==0.12.8"]
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "-q", f"turbos-jax[notebooks] @ git+{REPO}", *pins]
    )

# %%
import json
import math
import os
import shutil
import sys
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
import tokenizers
from absl import logging
from flax import nnx
from IPython.display import display

import turbos_jax
from turbos_jax import accounting, convert, train
from turbos_jax.config import ModelConfig
from turbos_jax.generate import restore_params
from turbos_jax.generation.api import generate
from turbos_jax.interop import hf
from turbos_jax.interop.safetensors_io import TensorReader

logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
SMOKE = os.environ.get("TURBOS_NOTEBOOK_SMOKE") == "1"
USE_HUB = "google.colab" in sys.modules and not SMOKE
HUB_MODEL = "ibm-granite/granite-4.0-h-350m"
FIXTURE = os.path.join(os.path.dirname(os.path.dirname(turbos_jax.__file__)), "tests", "fixtures", "hf")
WORK = tempfile.mkdtemp(prefix="turbos-hf-")
print("devices:", jax.devices())
print("checkpoint:", HUB_MODEL if USE_HUB else "tests/fixtures/hf/granite", "| files under", WORK)

# %% [markdown]
# ## The checkpoint and its PyTorch reference
#
# A Hugging Face checkpoint directory holds `config.json`, the safetensors shards and usually a
# `tokenizer.json`. The reference is what PyTorch (`transformers`, fp32) gives for the same input:
# the logits of one forward pass and a few greedily generated tokens.
#
# The fixture is a randomly initialised model with 96 token ids and no tokenizer. Training it needs
# text in those ids, so the next cell gives it a character-level tokenizer fitted to them: ids 0-2
# are the fixture's pad / BOS / EOS, 3 is `<unk>`, and 4-95 the 92 most frequent characters of the
# corpus bundled with Python that the trainer reads.


# %%
def pytorch_reference(hf_dir: str, text: str, new_tokens: int) -> dict:
    """Logits and greedy tokens from transformers (Colab only; the tests never import torch)."""
    import torch
    import transformers

    ids = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json")).encode(text).ids
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = torch_model(tokens, use_cache=False).logits
        greedy = torch_model.generate(
            tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new_tokens, do_sample=False
        )
    return {
        "tokens": np.array([ids], np.int32),
        "logits": logits.numpy(),
        "prompt": np.array(ids, np.int32),
        "greedy": greedy[0].numpy().astype(np.int32),
    }


def char_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A character-level tokenizer of `vocab_size` ids trained on the bundled corpus (a BPE with
    an alphabet that fills the vocabulary, so no merges)."""
    from tokenizers import decoders, models, trainers

    from turbos_jax.data.sources import EmbeddedSource

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # characters concatenated, no separator
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        limit_alphabet=vocab_size - len(specials),
        show_progress=False,
    )
    corpus = EmbeddedSource()
    tok.train_from_iterator((corpus[i] for i in range(len(corpus))), trainer, length=len(corpus))
    return tok


HF_DIR = os.path.join(WORK, "hf")
if USE_HUB:
    from huggingface_hub import snapshot_download

    snapshot_download(HUB_MODEL, local_dir=HF_DIR, allow_patterns=["*.json", "*.safetensors"])
    ref = pytorch_reference(HF_DIR, "The three primary colors are", new_tokens=8)
else:
    if not os.path.isdir(FIXTURE):
        raise FileNotFoundError(f"{FIXTURE}: run this notebook from a checkout of the repository")
    shutil.copytree(os.path.join(FIXTURE, "granite"), HF_DIR)
    ref = dict(np.load(os.path.join(HF_DIR, "ref.npz")))
    with open(os.path.join(HF_DIR, "config.json")) as f:
        char_tokenizer(json.load(f)["vocab_size"]).save(os.path.join(HF_DIR, "tokenizer.json"))
tokenizer = tokenizers.Tokenizer.from_file(os.path.join(HF_DIR, "tokenizer.json"))
print(sorted(os.listdir(HF_DIR)))
print("reference tokens", ref["tokens"].shape, "logits", ref["logits"].shape)

# %% [markdown]
# ## Load: the mapped config and the layout
#
# `hf.load(path)` reads `config.json` into a full train config (the model keys mapped from the
# checkpoint, fp32, dropless MoE; the run keys from `configs/turbos.py`) and each tensor into its
# place in a `TurbosModel`. A Granite layer is a mixer and its FFN, so HF layer *i* becomes layout
# symbols 2*i* and 2*i*+1 (M Mamba2, A attention, F MoE, D dense FFN); the trainer scans the
# repeating period of the layout.

# %%
config, model = hf.load(HF_DIR)
model_cfg = ModelConfig.from_config(config.model)
split = model_cfg.layout_split
print("layout:", model_cfg.layout)
print(f"  = {split.prefix!r} + {split.period!r} x {split.repeats} + {split.suffix!r}")
mapped = ["d_model", "vocab_size", "tie_embeddings", "position_encoding", "embedding_scale"]
mapped += ["residual_scale", "logits_scale", "attn_scale", "num_heads", "num_kv_heads", "mamba_heads"]
mapped += ["mamba_head_dim", "mamba_groups", "num_experts", "top_k", "expert_dim", "mlp_dim"]
for key in mapped:
    print(f"  config.model.{key} = {config.model[key]!r}")
sizes = accounting.summarize(model_cfg, ref["tokens"].shape[1])
print("layers by kind:", model_cfg.layer_counts())
print(f"parameters: {sizes['params_total']:,} ({sizes['params_active']:,} active per token)")

# %% [markdown]
# ## Logits against PyTorch
#
# One forward pass over the reference tokens; the error is max |JAX - PyTorch| / max |PyTorch| over
# all logits (the vocabulary is padded to a multiple of 128 on import; the padding columns are
# dropped). Matrix products run at full fp32 precision here, so the comparison means the same on a
# TPU, whose default fp32 matmul is faster and rougher.

# %%
with jax.default_matmul_precision("highest"):
    logits = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, ref["tokens"]))
logits = logits[..., : ref["logits"].shape[-1]]
rel_err = float(np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max())
# The fixture measures 3e-7; the 350M model (64 layers deep, Pallas kernels on a recent GPU or a
# TPU) accumulates more rounding. A wrong mapping gives 1e-2 or more (the tests' negative controls).
tolerance = 2e-3 if USE_HUB else 1e-4
print(f"max relative logit error: {rel_err:.2e} (tolerance {tolerance:.0e})")
assert rel_err < tolerance

# %% [markdown]
# ## Greedy generation
#
# `generate` prefills the prompt and decodes with the Mamba2 state and attention KV caches; greedy
# decoding must pick PyTorch's tokens.

# %%
graphdef, params = nnx.split(model)
prompt = ref["prompt"]
expected = ref["greedy"][len(prompt) :]
out, counts = generate(graphdef, params, prompt[None], [len(prompt)], max_new_tokens=len(expected))
new = np.asarray(out)[0, : int(counts[0])]
print("prompt:   ", repr(tokenizer.decode(prompt.tolist())))
print("JAX:      ", new.tolist(), repr(tokenizer.decode(new.tolist())))
print("PyTorch:  ", expected.tolist())
np.testing.assert_array_equal(new, expected[: len(new)])

# %% [markdown]
# ## Convert to a trainer workdir
#
# `convert.from_hf` is what `python -m turbos_jax.convert --from_hf=DIR --workdir=W` runs. It
# writes the train config (`config.json`, with the source config.json inside as `hf_config` and
# the checkpoint's tokenizer as `data.tokenizer`), a `config.py` that loads it, and checkpoint 0:
# the parameters, a fresh AdamW state and the data iterator.

# %%
WORKDIR = os.path.join(WORK, "workdir")
n_params = convert.from_hf(HF_DIR, WORKDIR)
print(f"imported {n_params:,} parameters (vocabulary padded to {model_cfg.padded_vocab})")
print(sorted(os.listdir(WORKDIR)), "checkpoints:", sorted(os.listdir(os.path.join(WORKDIR, "checkpoints"))))

# %% [markdown]
# ## Fine-tune with a live loss plot
#
# The converted config keeps TurboS's pre-training run keys (4K sequences, batches of 2,240, 1.8M
# steps); set the ones for this run, as `--config.KEY=VALUE` would on the command line.
# `train_and_evaluate` on the converted workdir resumes at step 1 from the imported parameters and
# trains on the corpus bundled with Python, tokenized with the checkpoint's tokenizer.

# %%
run = convert.read_workdir_config(WORKDIR)
run.total_steps = 8 if SMOKE else 40
run.batch_size, run.grad_accum_steps = 4, 1
run.seq_len = 256 if USE_HUB else 64
run.log_every_steps = run.eval_every_steps = 2 if SMOKE else 4  # held-out loss at every log
run.eval_batches = 1 if SMOKE else 2  # the same held-out batches at each evaluation
run.checkpoint_every_steps = run.total_steps  # one save, at the end
peak_lr = 2e-5 if USE_HUB else 3e-3  # the fixture is random: it can take large steps
run.optim.schedule = (("warmup", 2, peak_lr), ("cosine", run.total_steps - 2, peak_lr / 10))

history = {"step": [], "loss": [], "eval_step": [], "eval_loss": []}
fig, ax = plt.subplots(figsize=(7, 3.5))
plt.close(fig)  # drawn through the display handle only
handle = display(fig, display_id=True)


def plot_live(step, row):
    if "loss" in row:
        history["step"].append(step)
        history["loss"].append(row["loss"])
    if "eval_loss" in row:
        history["eval_step"].append(step)
        history["eval_loss"].append(row["eval_loss"])
    ax.clear()
    ax.plot(history["step"], history["loss"], label="train loss")
    ax.plot(history["eval_step"], history["eval_loss"], "o-", label="held-out loss")
    if not USE_HUB:
        ax.axhline(
            math.log(config.model.vocab_size),
            color="grey",
            ls=":",
            label=f"ln {config.model.vocab_size} (uniform)",
        )
    ax.set(xlabel="step", ylabel="cross-entropy (nats / token)", xlim=(0, run.total_steps))
    ax.legend(loc="upper right")
    handle.update(fig)


last = train.train_and_evaluate(run, WORKDIR, on_log=plot_live)
print({k: round(v, 4) for k, v in last.items() if k in ("step", "loss", "eval_loss", "lr")})
assert last["step"] == run.total_steps and all(map(math.isfinite, history["loss"]))
assert history["eval_loss"][-1] < history["eval_loss"][0], "the held-out loss did not fall"

# %% [markdown]
# ## Export back to Hugging Face format
#
# `hf.export` runs the import rules backwards. The imported model, exported in the source dtype,
# gives back the very same tensors (bit for bit) and config.json. The fine-tuned checkpoint goes
# out with `convert.to_hf`, what `python -m turbos_jax.convert --to_hf=DIR --workdir=W` runs, here
# in fp32 (the default is the source dtype, bf16 for the Hub model); importing it again gives the
# trained parameters unchanged.

# %%
source = TensorReader(HF_DIR)
ROUND_TRIP = os.path.join(WORK, "round_trip")
hf.export(config, model, ROUND_TRIP)
back = TensorReader(ROUND_TRIP)
assert back.keys() == source.keys()
for key in source.keys():
    a, b = source.read(key), back.read(key)
    assert a.dtype == b.dtype and np.array_equal(a, b), key
with open(os.path.join(HF_DIR, "config.json")) as f, open(os.path.join(ROUND_TRIP, "config.json")) as g:
    source_config, exported_config = json.load(f), json.load(g)
# Export records the tensor dtype under transformers 5's key `dtype` (older files: `torch_dtype`).
assert source_config | {"dtype": exported_config["dtype"]} == exported_config
print(f"round trip: all {len(source.keys())} tensors and config.json identical to the source")

TUNED = os.path.join(WORK, "fine_tuned_hf")
files = convert.to_hf(WORKDIR, TUNED, dtype="float32")
print("exported:", files)
_, trained, step = restore_params(ModelConfig.from_config(run.model), WORKDIR)
_, reloaded = hf.load(TUNED)
pairs = zip(jax.tree.leaves(trained), jax.tree.leaves(nnx.state(reloaded)), strict=True)
assert all(np.array_equal(a, b) for a, b in pairs)
leaves_before, leaves_after = jax.tree.leaves(params), jax.tree.leaves(trained)
changed = sum(bool(np.any(a != b)) for a, b in zip(leaves_before, leaves_after, strict=True))
print(
    f"the step-{step} export re-imports bit-exact; {changed} of {len(leaves_before)} parameter arrays changed"
)
