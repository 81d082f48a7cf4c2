"""flextron_kernels: Triton and CUDA kernels, with PyTorch ops, for elastic LLMs."""

__version__ = "0.1.0"
