"""The long-context stage configs (configs/turbos_32k.py, turbos_256k.py): what they change from the
4K run, that they validate, and that their meshes map onto the v5p slice they name."""

import pytest
from tpu_aot import tpu_devices

from configs import turbos, turbos_32k, turbos_256k
from turbos_jax import sharding
from turbos_jax.config import ModelConfig, check_train_config

# The keys a stage may change; anything else differing from configs/turbos.py is a mistake.
STAGE_KEYS = {
    "total_steps",
    "batch_size",
    "grad_accum_steps",
    "seq_len",
    "eval_every_steps",
    "checkpoint_every_steps",
    "mesh.data",
    "mesh.expert",
    "mesh.model",
    "mesh.context",
    "data.sources",
    "data.mixture",
    "optim.schedule",
    "model.rope_alpha",
}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "sources":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize(
    "module, before, seq_len, alpha, tokens_per_step",
    [
        (turbos_32k, turbos.get_config(), 32_768, 50.0, 8.4e6),
        (turbos_256k, turbos_32k.get_config(), 262_144, 1000.0, 9.4e6),
    ],
)
def test_stage_changes_only_stage_keys(module, before, seq_len, alpha, tokens_per_step):
    config = module.get_config()
    check_train_config(config)
    ModelConfig.from_config(config.model)
    new, old = _flat(config.to_dict()), _flat(turbos.get_config().to_dict())
    assert set(new) == set(old)
    changed = {k for k in new if new[k] != old[k]}
    assert changed <= STAGE_KEYS, changed - STAGE_KEYS
    assert config.seq_len == seq_len and config.model.rope_alpha == alpha
    # The step counts on from the previous stage, and the constant 5e-6 covers every step of this one.
    assert config.total_steps == before.total_steps + module.STAGE_STEPS
    assert config.optim.schedule == (("constant", config.total_steps, 5e-6),)
    assert config.batch_size * config.seq_len == pytest.approx(tokens_per_step, rel=0.01)
    weights = dict(config.data.mixture[0][1])
    assert weights["short"] / weights["long"] == 3.0
    shape = sharding.mesh_shape(config.mesh, 512)
    assert shape["context"] > 1 and config.seq_len % shape["context"] == 0


@pytest.mark.parametrize("module", [turbos_32k, turbos_256k])
def test_stage_mesh_maps_onto_v5p_slice(module):
    """Mesh sizes such as data 4 x context 2 split one physical axis of the 8x8x8 torus."""
    config = module.get_config()
    model_cfg = ModelConfig.from_config(config.model)
    mesh = sharding.train_mesh(config, model_cfg, tpu_devices("v5p:8x8x8"))
    assert dict(mesh.shape) == sharding.mesh_shape(config.mesh, 512)
    assert len(set(mesh.devices.flat)) == 512
