"""The op layer: argument checks, backend dispatch, autograd and torch.library registration.

One module per op. Kernels live in ``flextron_kernels.triton`` and the compiled
extension; the meaning of every op is in ``flextron_kernels.reference``.
"""

from flextron_kernels.ops.checks import skip_width_value_checks
from flextron_kernels.ops.common import full_size_weight_grads
from flextron_kernels.ops.elastic_attention import elastic_attention
from flextron_kernels.ops.elastic_attention_decode import elastic_attention_decode
from flextron_kernels.ops.elastic_attention_extend import elastic_attention_extend
from flextron_kernels.ops.elastic_linear import elastic_linear
from flextron_kernels.ops.elastic_mlp import elastic_mlp
from flextron_kernels.ops.elastic_mlp_decode import elastic_mlp_decode
from flextron_kernels.ops.routing import default_boundaries, routing_metadata

__all__ = [
    "default_boundaries",
    "elastic_attention",
    "elastic_attention_decode",
    "elastic_attention_extend",
    "elastic_linear",
    "elastic_mlp",
    "elastic_mlp_decode",
    "full_size_weight_grads",
    "routing_metadata",
    "skip_width_value_checks",
]
