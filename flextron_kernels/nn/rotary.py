"""Rotary position embeddings (Llama's ``rotate_half`` convention) and the RoPE scalings
of Llama-family checkpoints, computed as Hugging Face ``transformers`` computes them.

``scaling`` is None (plain RoPE) or a dict in the checkpoints' ``rope_scaling`` form:
- ``{"rope_type": "linear", "factor": f}``: every frequency divided by ``f``;
- ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}``: Llama 3.1's scaling of the low frequencies;
- ``{"rope_type": "yarn", "factor", "original_max_position_embeddings"}``, optionally
  ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``beta_fast``, ``beta_slow``,
  ``truncate``: YaRN (Qwen2.5's long-context setting), whose ``attention_factor``
  scales the cosines and sines.
Other types (``dynamic`` NTK, whose frequencies change with the length of each call,
``longrope``) are refused by :func:`check_rope_scaling`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ROPE_TYPES = ("linear", "llama3", "yarn")
_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
_OPTIONAL = {"yarn": ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow", "truncate")}


def check_rope_scaling(scaling: Optional[dict]) -> Optional[dict]:
    """``scaling`` checked (its type known, its parameters present and no others), or None."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling: expected None or a dict, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: expected rope_type among {', '.join(ROPE_TYPES)} (or no scaling), got {rope_type!r}")
    missing = [key for key in _REQUIRED[rope_type] if scaling.get(key) is None]
    unknown = set(scaling) - {"rope_type", *_REQUIRED[rope_type], *_OPTIONAL.get(rope_type, ())}
    if missing or unknown:
        raise ValueError(f"rope_scaling: a {rope_type!r} scaling takes {', '.join(_REQUIRED[rope_type])}"
                         + (f" (optionally {', '.join(_OPTIONAL[rope_type])})" if rope_type in _OPTIONAL else "")
                         + f"; missing {missing}, unknown {sorted(unknown)}")
    for key, value in scaling.items():
        if key == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"rope_scaling: expected truncate to be a bool, got {value!r}")
        elif key in ("mscale", "mscale_all_dim"):  # 0 means "not given", as in transformers
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"rope_scaling: expected {key} to be a number >= 0, got {value!r}")
        elif key != "rope_type" and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"rope_scaling: expected {key} to be a positive number, got {value!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"rope_scaling: expected high_freq_factor > low_freq_factor, got {scaling['high_freq_factor']} "
                         f"and {scaling['low_freq_factor']}")
    return scaling


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict], device=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim // 2] fp32, attention_factor)``: the rotation rate of each
    pair of dimensions, and the factor on the cosines and sines (1 but for YaRN). Each
    rounds as transformers' does, so that the tables are the same bits."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).to(torch.float32) / head_dim
    wavelength_base = theta**exponents
    base_freq = 1.0 / wavelength_base
    if scaling is None:
        return base_freq, 1.0
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "linear":
        return base_freq / factor, 1.0
    if kind == "llama3":
        context = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / base_freq
        # Long wavelengths are divided by the factor, short ones kept, those between blended.
        scaled = torch.where(wavelength > context / low, base_freq / factor, base_freq)
        smooth = (context / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        return torch.where(medium, blended, scaled), 1.0
    return _yarn_frequencies(head_dim, theta, scaling, wavelength_base)


def _yarn_frequencies(head_dim, theta, scaling, wavelength_base):
    factor = scaling["factor"]

    def magnitude(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (magnitude(factor, mscale) / magnitude(factor, mscale_all_dim) if mscale and mscale_all_dim
                            else magnitude(factor))

    def correction_dim(rotations):
        context = scaling["original_max_position_embeddings"]
        return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=wavelength_base.device) - low)
            / (high - low)).clamp(0, 1)
    # Dimensions that rotate fast keep their frequency (extrapolate), slow ones are divided
    # by the factor (interpolate), a ramp between.
    keep = 1 - ramp
    return (1.0 / (factor * wavelength_base) * (1 - keep) + 1.0 / wavelength_base * keep), float(attention_factor)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                   scaling: Optional[dict] = None):
    """The rotary tables of ``positions [T]``: ``cos, sin [T, head_dim]`` in ``dtype``."""
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, positions.device)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, Dh]`` rotated as in Llama (``rotate_half`` convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
