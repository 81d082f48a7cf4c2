"""Training: elastic continued-training (stage 1), router training with a surrogate
model and a latency table (stage 2), joint fine-tuning (stage 3), and the data they use."""

from flextron_kernels.training.data import ByteTokenizer, PackedSequences, find_files, load_tokenizer, tokenize_files
from flextron_kernels.training.elastic import ElasticConfig, elastic_train
from flextron_kernels.training.joint import JointConfig, joint_train
from flextron_kernels.training.routers import (
    RouterConfig,
    Surrogate,
    routed_cost_ratio,
    token_routed_cost_ratio,
    train_routers,
)

__all__ = [
    "ByteTokenizer",
    "ElasticConfig",
    "JointConfig",
    "PackedSequences",
    "RouterConfig",
    "Surrogate",
    "elastic_train",
    "find_files",
    "joint_train",
    "load_tokenizer",
    "routed_cost_ratio",
    "token_routed_cost_ratio",
    "tokenize_files",
    "train_routers",
]
