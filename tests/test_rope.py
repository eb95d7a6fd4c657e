"""``cos_sin`` against the models' own rotary modules, and apply/invert round trips with its output."""

from __future__ import annotations

import pytest
import torch
import transformers

from kava.core.errors import ConfigError, ShapeError
from kava.extract.rope import apply_rope, cos_sin, invert_rope, rope_params

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 32}


def tiny_config(arch: str, **kwargs: object) -> transformers.PreTrainedConfig:
    cls = getattr(transformers, f"{arch}Config")
    return cls(**{**TINY, "num_attention_heads": 4, "num_key_value_heads": 2, **kwargs})


CONFIGS = {
    "llama-default": lambda: tiny_config("Llama"),
    "llama-llama3": lambda: tiny_config(
        "Llama",
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-yarn": lambda: tiny_config(
        "Llama",
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-linear": lambda: tiny_config(
        "Llama", rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}
    ),
    "qwen2": lambda: tiny_config("Qwen2"),
    "phi-partial": lambda: tiny_config("Phi", partial_rotary_factor=0.5, num_key_value_heads=4),
    "phi3-longrope": lambda: tiny_config(
        "Phi3",
        max_position_embeddings=128,
        original_max_position_embeddings=32,  # Phi3Config overrides the one in rope_parameters with this
        pad_token_id=0,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.5, 2.0, 2.5],
            "long_factor": [3.0, 4.0, 5.0, 6.0],
            "original_max_position_embeddings": 32,
        },
    ),
}


def rotary_module(config: transformers.PreTrainedConfig) -> torch.nn.Module:
    arch = type(config).__name__.removesuffix("Config").removesuffix("Text")
    model_cls = getattr(transformers, f"{arch}TextModel", None) or getattr(transformers, f"{arch}Model")
    torch.manual_seed(0)
    return model_cls(config).rotary_emb


POSITIONS = {
    "1d": torch.arange(40),
    "2d": torch.stack([torch.arange(40), torch.arange(40) + 7]),  # e.g. a left-padded row
    "long": torch.arange(100),  # beyond the llama3/longrope/yarn original context
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("pos_name", sorted(POSITIONS))
def test_cos_sin_matches_the_models_rotary_module(name: str, pos_name: str) -> None:
    config = CONFIGS[name]()
    positions = POSITIONS[pos_name]
    module = rotary_module(config)
    position_ids = positions if positions.dim() == 2 else positions.unsqueeze(0)
    ref_cos, ref_sin = module(torch.zeros(1), position_ids)
    cos, sin = cos_sin(rope_params(config), positions)
    rotary_dim = rope_params(config)["rotary_dim"]
    assert cos.shape == ref_cos.shape == (position_ids.shape[0], position_ids.shape[1], rotary_dim)
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)


def test_attention_factor_is_folded_in_for_yarn() -> None:
    config = CONFIGS["llama-yarn"]()
    cos, sin = cos_sin(rope_params(config), torch.arange(10))
    factor = 0.1 * torch.log(torch.tensor(4.0)) + 1.0  # YaRN's default mscale for factor 4
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, float(factor) ** 2))


def test_longrope_switches_to_long_factors_past_the_original_context() -> None:
    params = rope_params(CONFIGS["phi3-longrope"]())
    assert params["scaling"]["original_max_position_embeddings"] == 32
    short = cos_sin(params, torch.arange(20))[0]
    long = cos_sin(params, torch.arange(40))[0]
    assert not torch.allclose(short[:, 5:20], long[:, 5:20])


def test_cos_sin_per_layer_type() -> None:
    config = transformers.Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 2},
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    module = rotary_module(config)
    params = rope_params(config)
    positions = torch.arange(30)
    for layer_type in ("sliding_attention", "full_attention"):
        ref_cos, ref_sin = module(torch.zeros(1), positions.unsqueeze(0), layer_type)
        cos, sin = cos_sin(params, positions, layer_type=layer_type)
        torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)
    assert not torch.allclose(*(cos_sin(params, positions, layer_type=t)[0] for t in params["layer_types"]))
    expected = r"Expected layer_type to be one of \['full_attention', 'sliding_attention'\]. Got None"
    with pytest.raises(ConfigError, match=expected):
        cos_sin(params, positions)
    with pytest.raises(ConfigError, match="Got 'local' instead"):
        cos_sin(params, positions, layer_type="local")


def test_cos_sin_dtype_and_errors() -> None:
    params = rope_params(CONFIGS["qwen2"]())
    cos, _ = cos_sin(params, torch.arange(5), dtype=torch.bfloat16)
    assert cos.dtype == torch.bfloat16
    with pytest.raises(ShapeError, match=r"Expected integer positions of shape \[T\] or \[B, T\]"):
        cos_sin(params, torch.arange(5.0))
    dynamic = dict(params, type="dynamic", scaling={"factor": 2.0})
    with pytest.raises(ConfigError, match="Got 'dynamic' \\(NTK\\) instead.*--k-rope post"):
        cos_sin(dynamic, torch.arange(5))
    with pytest.raises(ConfigError, match="Got 'spiral' instead"):
        cos_sin(dict(params, type="spiral"), torch.arange(5))


@pytest.mark.parametrize("name", ["llama-default", "llama-yarn", "phi-partial", "phi3-longrope"])
def test_apply_then_invert_round_trips(name: str) -> None:
    params = rope_params(CONFIGS[name]())
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50, params["head_dim"])
    positions = torch.stack([torch.arange(50), torch.arange(50) + 3])
    cos, sin = cos_sin(params, positions)
    rotated = apply_rope(x, cos, sin)
    assert not torch.allclose(rotated[..., 1:, :], x[..., 1:, :])
    torch.testing.assert_close(invert_rope(rotated, cos, sin), x, atol=1e-5, rtol=1e-5)
    if params["rotary_dim"] < params["head_dim"]:
        torch.testing.assert_close(rotated[..., params["rotary_dim"] :], x[..., params["rotary_dim"] :])
