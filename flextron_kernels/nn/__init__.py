"""Module wrappers around the ops (no kernel code here)."""

from flextron_kernels.nn.attention import ElasticAttention, KVCache
from flextron_kernels.nn.linear import ElasticLinear
from flextron_kernels.nn.mlp import ElasticMLP

__all__ = ["ElasticAttention", "ElasticLinear", "ElasticMLP", "KVCache"]
