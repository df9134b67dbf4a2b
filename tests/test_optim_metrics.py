"""Optimizer: schedule, decay mask, AdamW + clipping. Metrics: JSONL, TensorBoard, MFU, progress."""

import io
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny, turbos
from turbos_jax import metrics, optim
from turbos_jax.config import ConfigError, ModelConfig
from turbos_jax.model import init_model

# ---------------------------------------------------------------------- schedule
SCHEDULE = (("warmup", 10, 1.0), ("cosine", 20, 0.2), ("anneal", 4, 0.1), ("constant", 6, 0.05))
COS_Q = 0.5 * (1 + math.cos(math.pi / 4))  # cosine factor at a quarter of a phase
COS_3Q = 0.5 * (1 + math.cos(3 * math.pi / 4))


@pytest.mark.parametrize(
    "step, lr",
    [
        (0, 0.0),
        (5, 0.5),
        (10, 1.0),  # warmup from 0; boundary = its end
        (15, 0.2 + 0.8 * COS_Q),
        (20, 0.6),
        (30, 0.2),  # cosine 1.0 -> 0.2 over 20
        (31, 0.1 + 0.1 * COS_Q),
        (32, 0.15),
        (33, 0.1 + 0.1 * COS_3Q),  # anneal 0.2 -> 0.1 over 4
        (34, 0.05),
        (37, 0.05),
        (39, 0.05),  # constant: jumps 0.1 -> 0.05 at 34
        (40, 0.05),
        (10_000, 0.05),  # after the end: last end_lr
    ],
)
def test_schedule_values(step, lr):
    sched = optim.make_schedule(SCHEDULE)
    assert optim.learning_rate_at(sched, step) == pytest.approx(lr, rel=1e-5, abs=1e-7)
    assert optim.schedule_length(SCHEDULE) == 40


def test_schedule_single_and_constant_first():
    one = optim.make_schedule((("warmup", 4, 2.0),))
    assert [optim.learning_rate_at(one, s) for s in (0, 2, 4, 99)] == pytest.approx([0, 1, 2, 2])
    s = optim.make_schedule([("constant", 5, 0.3), ("cosine", 10, 0.0)])
    got = [optim.learning_rate_at(s, t) for t in (0, 4, 5, 10, 15, 50)]
    assert got == pytest.approx([0.3, 0.3, 0.3, 0.15, 0.0, 0.0], abs=1e-7)
    # Jit-able with a traced count (optax's int32 step counter).
    assert float(jax.jit(s)(jnp.int32(10))) == pytest.approx(0.15)


def test_schedule_real_config():
    sched = optim.make_schedule(turbos.get_config().optim.schedule)
    assert optim.learning_rate_at(sched, 2000) == pytest.approx(3e-4)
    assert optim.learning_rate_at(sched, 1_702_000) == pytest.approx(3e-5, rel=1e-5)
    assert optim.learning_rate_at(sched, 1_800_000) == pytest.approx(5e-6, rel=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        (("linear", 10, 1.0),),
        (("warmup", 0, 1.0),),
        (("warmup", -3, 1.0),),
        (("warmup", 10.0, 1.0),),
        (("warmup", 10, -1e-4),),
        (("warmup", 10, float("nan")),),
        (("warmup", 10, "1e-4"),),
        (("warmup", 10),),
        (),
        "warmup",
        None,
        (("warmup", 10, 1.0), ("cosine", True, 0.1)),
    ],
)
def test_schedule_invalid(bad):
    with pytest.raises(ConfigError, match=r"config\.optim\.schedule") as e:
        optim.make_schedule(bad)
    assert "\n" not in str(e.value)


def test_optimizer_config_errors():
    good = turbos.get_config().optim.to_dict()
    optim.make_optimizer(turbos.get_config().optim)  # a ConfigDict works as is
    for key, value, msg in [
        ("b2", 1.0, "b2"),
        ("eps", 0.0, "eps"),
        ("weight_decay", -1, "weight"),
        ("grad_clip", "1", "grad_clip"),
        ("lr", 1.0, "unknown"),
    ]:
        with pytest.raises(ConfigError, match=rf"config\.optim\.\w+.*{msg}|{msg}.*"):
            optim.make_optimizer(good | {key: value})
    with pytest.raises(ConfigError, match=r"config\.optim\.b1: required"):
        optim.make_optimizer({k: v for k, v in good.items() if k != "b1"})


# ---------------------------------------------------------------------- decay mask
@pytest.fixture(scope="module")
def tiny_params():
    graphdef, state = init_model(ModelConfig.from_config(tiny.get_config().model), seed=0)
    _, params, _ = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
    return params


def _mask_by_path(mask):
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(mask):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        out["/".join(n for n in names if n != "value")] = leaf
    return out


def test_decay_mask_tiny_model(tiny_params):
    mask = optim.decay_mask(tiny_params)
    assert jax.tree.structure(mask) == jax.tree.structure(tiny_params)
    by_path = _mask_by_path(mask)
    assert all(isinstance(v, bool) for v in by_path.values())
    off = [p for p, v in by_path.items() if not v]
    on = [p for p, v in by_path.items() if v]
    last = lambda p: p.rsplit("/", 1)[-1]
    assert {last(p) for p in off} == {
        "scale",
        "A_log",
        "D",
        "dt_bias",
        "x_bias",
        "B_bias",
        "C_bias",
        "embedding",
    }
    assert "embed/embedding" in off and "final_norm/scale" in off
    assert any(p.endswith("q_norm/scale") for p in off)
    assert any(p.endswith("layer/norm/scale") for p in off)  # Mamba2 gated norm
    assert "lm_head/kernel" in on
    for name in (
        "q_proj",
        "k_proj",
        "o_proj",
        "wi_gate",
        "wi_up",
        "wo",
        "router",
        "shared_up",
        "in_proj/z",
        "in_proj/dt",
        "conv1d/x",
        "out_proj",
    ):
        assert any(p.endswith(name) for p in on), name
    # A pure dict of the same state (no trailing `value` key) gets the same mask.
    assert _mask_by_path(optim.decay_mask(nnx.to_pure_dict(tiny_params))) == by_path


def test_zero_grad_step_decays_only_masked(tiny_params):
    """With zero gradients Adam's update is 0, so one step only applies decay: decayed leaves shrink
    by (1 - lr * wd), the others stay put."""
    cfg = {
        "schedule": (("constant", 1, 0.1),),
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.5,
        "grad_clip": 1.0,
    }
    tx = optim.make_optimizer(cfg)

    @jax.jit
    def step(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = _mask_by_path(step(tiny_params))
    old = _mask_by_path(tiny_params)
    for path, decayed in _mask_by_path(optim.decay_mask(tiny_params)).items():
        want = old[path] * (1 - 0.1 * 0.5) if decayed else old[path]
        np.testing.assert_allclose(new[path], want, rtol=1e-6, err_msg=path)


def test_adamw_with_clipping_matches_hand_computation():
    b1, b2, eps, wd, clip = 0.9, 0.95, 1e-8, 0.1, 1.0
    cfg = {
        "schedule": (("constant", 1, 0.1), ("constant", 1, 0.05)),
        "b1": b1,
        "b2": b2,
        "eps": eps,
        "weight_decay": wd,
        "grad_clip": clip,
    }
    tx = optim.make_optimizer(cfg)
    a = {"kernel": np.array([[1.0, 2.0], [3.0, 0.5]]), "scale": np.array([4.0, 0.25])}
    t = {"kernel": np.array([[0.5, -1.0], [0.0, 2.0]]), "scale": np.array([1.0, -2.0])}
    loss = lambda p: sum(0.5 * jnp.sum(a[k] * (p[k] - t[k]) ** 2) for k in p)
    params = {"kernel": jnp.array([[1.0, -1.0], [2.0, 0.5]]), "scale": jnp.array([1.5, 3.0])}
    state = tx.init(params)

    ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in ref.items()}
    nu = {k: np.zeros_like(v) for k, v in ref.items()}
    for count, lr in enumerate([0.1, 0.05, 0.05]):  # the schedule at counts 0, 1, 2
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)

        g = {k: a[k] * (ref[k] - t[k]) for k in ref}
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in g.values()))
        assert norm > clip  # clipping is exercised
        g = {k: v * clip / norm for k, v in g.items()}
        for k in ref:
            mu[k] = b1 * mu[k] + (1 - b1) * g[k]
            nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
            mhat, vhat = mu[k] / (1 - b1 ** (count + 1)), nu[k] / (1 - b2 ** (count + 1))
            upd = mhat / (np.sqrt(vhat) + eps) + (wd * ref[k] if k == "kernel" else 0.0)
            ref[k] = ref[k] - lr * upd
        for k in ref:
            np.testing.assert_allclose(params[k], ref[k], rtol=1e-5, err_msg=f"{k} step {count}")


# ---------------------------------------------------------------------- metrics writer
def _strict_lines(path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    with open(path) as f:
        return [json.loads(line, parse_constant=no_constants) for line in f]


def test_metrics_writer_jsonl_tensorboard_and_resume(tmp_path):
    load = jnp.array([0.5, 1.5, 1.0, 1.0])
    with metrics.MetricsWriter(str(tmp_path)) as w:
        w.write(
            10,
            {
                "loss": jnp.float32(5.5),
                "tokens_per_sec": 1234.5,
                "moe_expert_load": load,
                "lr": np.float64(3e-4),
                "phase": "train",
            },
        )
        w.write(20, {"loss": 4.25, "grad_norm": float("nan"), "skipped": 0})
    with metrics.MetricsWriter(str(tmp_path)) as w:  # a resumed run appends
        w.write(30, {"loss": 4.0})
    lines = _strict_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [10, 20, 30]
    assert lines[0] == {
        "step": 10,
        "loss": 5.5,
        "tokens_per_sec": 1234.5,
        "moe_expert_load": [0.5, 1.5, 1.0, 1.0],
        "lr": 3e-4,
        "phase": "train",
    }
    assert lines[1]["grad_norm"] is None and lines[1]["skipped"] == 0

    scalars = metrics.read_tensorboard_scalars(str(tmp_path))
    assert scalars["loss"] == [(10, 5.5), (20, 4.25), (30, 4.0)]
    assert scalars["moe_expert_load/1"] == [(10, 1.5)]
    assert math.isnan(scalars["grad_norm"][0][1])
    assert "phase" not in scalars

    # Resuming from the step-20 checkpoint drops the step-30 line (it will be logged again).
    with metrics.MetricsWriter(str(tmp_path), resume_step=20) as w:
        w.write(30, {"loss": 3.5})
    records = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in records] == [(10, 5.5), (20, 4.25), (30, 3.5)]


def test_metrics_writer_non_primary_writes_nothing(tmp_path):
    with metrics.MetricsWriter(str(tmp_path / "w"), is_primary=False) as w:
        w.write(1, {"loss": 1.0})
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------- throughput / progress
@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("cpu", None),
        ("TPU v4 lite", None),
    ],
)
def test_peak_flops_lookup(kind, peak):
    assert metrics.peak_flops_per_device(kind) == peak


def test_peak_flops_cpu_device_and_mfu_arithmetic():
    assert metrics.peak_flops_per_device(jax.devices()[0]) is None
    tp = metrics.throughput(2.0, 8192, 6e9, 4, 989e12)
    assert tp.tokens_per_sec == 4096
    assert tp.tflops_per_device == pytest.approx(4096 * 6e9 / 4 / 1e12)
    assert tp.mfu == pytest.approx(6.144e12 / 989e12)
    assert tp.metrics()["mfu"] == tp.mfu
    none = metrics.throughput(2.0, 8192, 6e9, 4, None)
    assert none.mfu is None and "mfu" not in none.metrics()


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_and_tty():
    out = io.StringIO()
    with metrics.Progress(100, initial_step=10, file=out) as p:
        p.update(20, {"loss": 2.5, "tokens_per_sec": 12345.6, "learning_rate": 3e-4, "other": 1})
        p.update(30, {"loss": jnp.float32(2.25)})
    lines = out.getvalue().splitlines()
    assert lines == ["step 20/100 | loss 2.5000 | lr 0.0003 | tok/s 12,346", "step 30/100 | loss 2.2500"]
    tty = _Tty()
    with metrics.Progress(100, file=tty) as p:
        p.update(50, {"loss": 1.0})
    assert "50/100" in tty.getvalue()


def test_metrics_writer_without_tensorboardx_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import now fails
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        metrics.MetricsWriter(str(tmp_path))
    with metrics.MetricsWriter(str(tmp_path), tensorboard=False) as w:  # JSONL only, by choice
        w.write(1, {"loss": 1.0})
    assert metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "loss": 1.0}]
    assert not [n for n in os.listdir(tmp_path) if "tfevents" in n]
