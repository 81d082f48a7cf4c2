"""MLP activations and their derivatives, for use inside Triton kernels.

``ACTIVATION`` is a constexpr string: ``"none"``, ``"silu"``, ``"gelu"`` (erf),
``"gelu_tanh"``, ``"relu"`` or ``"relu2"`` (squared ReLU). Inputs are fp32.
"""

import triton
import triton.language as tl

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        return z * tl.sigmoid(z)
    elif ACTIVATION == "gelu":
        return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT_HALF))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * z * (1.0 + _tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)))
    elif ACTIVATION == "relu":
        return tl.maximum(z, 0.0)
    elif ACTIVATION == "relu2":
        r = tl.maximum(z, 0.0)
        return r * r
    else:
        return z


@triton.jit
def activation_derivative(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == "gelu":
        return 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACTIVATION == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)
        t = _tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
    elif ACTIVATION == "relu":
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == "relu2":
        return 2.0 * tl.maximum(z, 0.0)
    else:
        return tl.full(z.shape, 1.0, tl.float32)
