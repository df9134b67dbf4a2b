"""The 560B TurboS config through `nnx.eval_shape`: counts, parameter bands, shapes, shardings."""

import json
import subprocess
import sys

import jax
import pytest
from flax import nnx
from helpers import ROOT
from jax.sharding import PartitionSpec as P

from configs import turbos
from turbos_jax import accounting, sharding
from turbos_jax.config import ModelConfig


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.from_config(turbos.get_config().model)


@pytest.fixture(scope="module")
def abstract(cfg):
    return accounting.abstract_model(cfg)


def test_parameter_totals_within_report_bands(cfg, abstract):
    counts = accounting.count_params(cfg, abstract)
    assert abs(counts.total / 560e9 - 1) < 0.02, counts.total
    assert abs(counts.active / 56e9 - 1) < 0.05, counts.active
    # One SwiGLU expert is 3 x 5120 x 17024; 64 MoE layers x 32 routed experts of them.
    assert counts.routed_experts == 64 * 32 * 3 * 5120 * 17024
    assert counts.by_kind["F"] == 64 * (33 * 3 * 5120 * 17024 + 5120 * 32 + 5120)


def test_layer_structure_and_shapes(cfg, abstract):
    # ("AF" + "MF" * 8) * 7 + "MF": the scanned period has 18 layers, stacked 7 times.
    assert [b.symbol for b in abstract.period] == list("AF" + "MF" * 8)
    assert [b.symbol for b in abstract.suffix] == ["M", "F"] and len(abstract.prefix) == 0
    attn, moe, mamba = abstract.period[0].layer, abstract.period[1].layer, abstract.period[2].layer
    assert attn.q_proj.shape == (7, 5120, 64, 128)
    assert attn.k_proj.shape == (7, 5120, 8, 128)
    assert moe.wi_gate.shape == (7, 32, 5120, 17024)
    assert moe.shared_down.shape == (7, 17024, 5120)
    assert mamba.in_proj["x"].shape == (7, 5120, 64, 64)
    assert mamba.in_proj["B"].shape == (7, 5120, 16, 128)
    assert mamba.out_proj.shape == (7, 64, 64, 5120)
    assert abstract.suffix[0].layer.A_log.shape == (64,)
    assert abstract.embed.embedding.shape == (131_072, 5120)


FSDP = ("data", "context")  # d_model's mesh axes (sharding.PARAM_RULES)


def test_partition_specs(abstract):
    specs = sharding.param_specs(nnx.state(abstract, nnx.Param))
    stack = specs["period"]
    assert stack[1]["layer"]["wi_gate"] == P(None, "expert", FSDP, "model")
    assert stack[1]["layer"]["wo"] == P(None, "expert", "model", FSDP)
    assert stack[1]["layer"]["router"] == P(None, FSDP, None)
    assert stack[0]["layer"]["q_proj"] == P(None, FSDP, "model", None)
    assert stack[0]["layer"]["k_proj"] == P(None, FSDP, "model", None)
    assert stack[2]["layer"]["in_proj"]["B"] == P(None, FSDP, "model", None)
    assert stack[2]["layer"]["conv1d"]["x"] == P(None, None, "model", None)
    assert stack[2]["norm"]["scale"] == P(None, FSDP)
    assert specs["suffix"][0]["layer"]["dt_bias"] == P("model")
    assert specs["embed"]["embedding"] == P("model", FSDP)
    assert specs["lm_head"]["kernel"] == P(FSDP, "model")
    # Every parameter got a spec of its own rank: nothing was left unannotated.
    state = nnx.state(abstract, nnx.Param)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    flat_vars = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(flat_specs) == len(flat_vars)
    for spec, var in zip(flat_specs, flat_vars, strict=True):
        assert len(spec) == len(var.get_value().shape)
        assert sharding.logical_names(var), "parameter created without logical axis names"


def test_summary_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "turbos_jax.summary", "--config=configs/turbos.py", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    s = json.loads(out.stdout)
    assert s["layers"] == {"A": 7, "M": 57, "F": 64}
    assert abs(s["params_total"] / 560e9 - 1) < 0.02
    assert abs(s["params_active"] / 56e9 - 1) < 0.05
    flops = s["training_flops_per_token"]
    # ~6 x active matmul params dominates; attention and the SSD scan are counted separately.
    assert 5.5 * s["params_active"] < flops["total"] < 6.5 * s["params_active"]
    assert flops["attention"] > 0 and flops["mamba2_scan"] > 0
    # 7 layers x (K + V) x 8 heads x 128 x 2 bytes
    assert s["kv_bytes_per_token"] == 7 * 2 * 8 * 128 * 2


def test_summary_cli_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from configs import tiny\n\ndef get_config():\n    c = tiny.get_config()\n"
        "    c.model.top_k = 99\n    return c\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "turbos_jax.summary", f"--config={bad}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == ("error: config.model.top_k=99: must be <= num_experts=8")
