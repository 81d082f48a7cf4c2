"""Module wrappers around the ops (no kernel code here)."""

from flextron_kernels.nn.linear import ElasticLinear

__all__ = ["ElasticLinear"]
