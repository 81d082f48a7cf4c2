"""The model layer: elastic transformers composed from the ops (no kernel code here)."""

from flextron_kernels.models.config import FlextronConfig, head_choices, mlp_width_choices
from flextron_kernels.models.convert import encoder_from_hf, from_hf
from flextron_kernels.models.encoder import FlextronEncoder
from flextron_kernels.models.modeling import FlextronForCausalLM
from flextron_kernels.models.routers import StaticRouter, TokenRouter

__all__ = [
    "FlextronConfig",
    "FlextronEncoder",
    "FlextronForCausalLM",
    "StaticRouter",
    "TokenRouter",
    "encoder_from_hf",
    "from_hf",
    "head_choices",
    "mlp_width_choices",
]
