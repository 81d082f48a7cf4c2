"""Rotary embeddings and the RoPE scalings of Llama-family checkpoints, against the
frequencies Hugging Face transformers computes for the same configs."""

import math

import pytest
import torch

from flextron_kernels.nn.rotary import apply_rotary, check_rope_scaling, rope_frequencies, rotary_cos_sin

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 512},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 32768},
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "mscale": 0.9,
     "mscale_all_dim": 0.6, "beta_fast": 24, "beta_slow": 2, "truncate": False},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024, "attention_factor": 1.3},
]


def _hf_frequencies(scaling, head_dim, theta, max_positions):
    transformers = pytest.importorskip("transformers", reason="compares with transformers' RoPE")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      rope_theta=theta, max_position_embeddings=max_positions,
                                      rope_scaling=dict(scaling) if scaling else None)
    if scaling is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(config=config, device=torch.device("cpu"))
    return ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, torch.device("cpu"))


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "plain" if s is None else "-".join(f"{v}" for v in s.values()))
@pytest.mark.parametrize("head_dim,theta", [(128, 500000.0), (128, 1000000.0), (64, 10000.0)])
def test_frequencies_match_transformers_bit_for_bit(scaling, head_dim, theta):
    expected, expected_factor = _hf_frequencies(scaling, head_dim, theta, 131072)
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, check_rope_scaling(scaling))
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (head_dim // 2,)
    assert torch.equal(inv_freq, expected), (inv_freq - expected).abs().max()
    assert attention_factor == pytest.approx(float(expected_factor), rel=1e-12)
    if scaling is not None:  # the scaling changes something: a test of it can fail
        assert not torch.allclose(inv_freq, rope_frequencies(head_dim, theta, None)[0])


def test_tables_carry_the_attention_factor_and_rotate_pairs():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    positions = torch.tensor([0, 1, 7, 100])
    cos, sin = rotary_cos_sin(positions, 16, 10000.0, torch.float32, scaling)
    factor = 0.1 * math.log(4.0) + 1.0
    torch.testing.assert_close(cos[0], torch.full((16,), factor))
    torch.testing.assert_close(cos**2 + sin**2, torch.full((4, 16), factor**2))
    x = torch.randn(4, 3, 16)
    plain_cos, plain_sin = rotary_cos_sin(positions, 16, 10000.0, torch.float32)
    rotated = apply_rotary(x, plain_cos, plain_sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


@pytest.mark.parametrize("scaling,message", [
    ("linear", "expected None or a dict, got str"),
    ({"rope_type": "dynamic", "factor": 2.0}, "expected rope_type among linear, llama3, yarn .* got 'dynamic'"),
    ({"rope_type": "longrope"}, "expected rope_type.* got 'longrope'"),
    ({"factor": 2.0}, "expected rope_type.* got None"),
    ({"rope_type": "llama3", "factor": 8.0}, r"missing \['low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'\]"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, r"unknown \['beta_fast'\]"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, "expected high_freq_factor > low_freq_factor"),
    ({"rope_type": "linear", "factor": 0}, "expected factor to be a positive number, got 0"),
    ({"rope_type": "linear", "factor": "2"}, "expected factor to be a positive number, got '2'"),
    ({"rope_type": "linear", "factor": True}, "expected factor to be a positive number, got True"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0},
     "expected original_max_position_embeddings to be a positive number, got 0"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "mscale": -1},
     "expected mscale to be a number >= 0, got -1"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "truncate": 1},
     "expected truncate to be a bool, got 1"),
])
def test_bad_scalings_are_refused_clearly(scaling, message):
    with pytest.raises(ValueError, match="^rope_scaling: .*" + message):
        check_rope_scaling(scaling)
