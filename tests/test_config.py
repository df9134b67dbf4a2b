"""Config loading, validation messages and layout splitting."""

import pytest

from configs import small, tiny, turbos
from turbos_jax.config import ConfigError, LayoutSplit, ModelConfig, split_layout


def _model_dict(**overrides):
    d = tiny.get_config().model.to_dict()
    d.update(overrides)
    return d


@pytest.mark.parametrize("module", [tiny, small, turbos])
def test_shipped_configs_load(module):
    cfg = ModelConfig.from_config(module.get_config().model)
    s = cfg.layout_split
    assert s.prefix + s.period * s.repeats + s.suffix == cfg.layout


def test_turbos_layout_counts():
    cfg = ModelConfig.from_config(turbos.get_config().model)
    assert len(cfg.layout) == 128
    assert cfg.layer_counts() == {"A": 7, "M": 57, "F": 64}
    assert cfg.layout_split == LayoutSplit("", "AF" + "MF" * 8, 7, "MF")


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("MFMFMF", LayoutSplit("", "MF", 3, "")),
        ("AMFMFMF", LayoutSplit("A", "MF", 3, "")),
        ("AFMFMFAF", LayoutSplit("A", "FM", 2, "FAF")),  # tie: earliest start wins
        ("AMF", LayoutSplit("", "AMF", 1, "")),
        ("AMFAMFMF", LayoutSplit("", "AMF", 2, "MF")),
        ("M", LayoutSplit("", "M", 1, "")),
    ],
)
def test_split_layout(layout, expected):
    assert split_layout(layout) == expected


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        ({"layout": "AXF"}, "layout", "unknown layer symbol 'X'"),
        ({"layout": ""}, "layout", "empty"),
        ({"num_heads": 6, "num_kv_heads": 4}, "num_heads", "divisible by num_kv_heads=4"),
        ({"mamba_heads": 6, "mamba_groups": 4}, "mamba_heads", "divisible by mamba_groups=4"),
        ({"top_k": 9}, "top_k", "<= num_experts=8"),
        ({"mamba_chunk": 0}, "mamba_chunk", "positive"),
        ({"head_dim": 15}, "head_dim", "even"),
        ({"capacity_factor": -1.0}, "capacity_factor", ">= 0"),
        ({"rope_alpha": 0.5}, "rope_alpha", ">= 1"),
        ({"mamba_dt_limit": (0.1, 0.01)}, "mamba_dt_limit", "low < high"),
        ({"remat_policy": "some"}, "remat_policy", "expected one of"),
        ({"kernel_impl": "cuda"}, "kernel_impl", "expected one of"),
        ({"dtype": "float64"}, "dtype", "expected one of"),
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype", "expected one of"),
        ({"ssm_state_dtype": "float64"}, "ssm_state_dtype", "expected one of"),
        ({"z_loss_weight": -1.0}, "z_loss_weight", ">= 0"),
    ],
)
def test_validation_names_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_config(_model_dict(**overrides))
    msg = str(err.value)
    assert msg.startswith(f"config.model.{key}=") and fragment in msg
    assert "\n" not in msg


def test_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match=r"config\.model\.hidden_size: unknown key"):
        ModelConfig.from_config(_model_dict(hidden_size=3))
    d = _model_dict()
    del d["top_k"]
    with pytest.raises(ConfigError, match=r"config\.model\.top_k: required key is missing"):
        ModelConfig.from_config(d)


def test_capacity():
    cfg = ModelConfig.from_config(_model_dict(capacity_factor=1.5))
    # 1.5 * 64 tokens * 2 choices / 8 experts = 24 slots per expert
    assert cfg.capacity(64) == 24
    assert cfg.capacity(1) == 1
