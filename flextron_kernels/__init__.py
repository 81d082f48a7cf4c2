"""flextron_kernels: Triton and CUDA kernels, with PyTorch ops, for elastic LLMs.

Public API:
- ops: :func:`elastic_linear`, :func:`elastic_mlp`, :func:`elastic_mlp_decode`,
  :func:`elastic_attention`, :func:`elastic_attention_decode`, :func:`elastic_attention_extend`,
  :func:`routing_metadata`;
- modules: :class:`ElasticLinear`, :class:`ElasticMLP`;
- backends: :func:`use_backend`, :func:`build_info`;
- :mod:`flextron_kernels.reference`: the meaning of every op in plain PyTorch.
"""

__version__ = "0.1.0"

from flextron_kernels import reference
from flextron_kernels.backends import BACKENDS, build_info, use_backend
from flextron_kernels.nn import ElasticLinear, ElasticMLP
from flextron_kernels.ops import (
    default_boundaries,
    elastic_attention,
    elastic_attention_decode,
    elastic_attention_extend,
    elastic_linear,
    elastic_mlp,
    elastic_mlp_decode,
    full_size_weight_grads,
    routing_metadata,
    skip_width_value_checks,
)

__all__ = [
    "BACKENDS",
    "ElasticLinear",
    "ElasticMLP",
    "__version__",
    "build_info",
    "default_boundaries",
    "elastic_attention",
    "elastic_attention_decode",
    "elastic_attention_extend",
    "elastic_linear",
    "elastic_mlp",
    "elastic_mlp_decode",
    "full_size_weight_grads",
    "reference",
    "routing_metadata",
    "skip_width_value_checks",
    "use_backend",
]
