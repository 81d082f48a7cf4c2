"""FlextronEncoder: an elastic BERT-family encoder giving sentence embeddings at a budget.

Post-LayerNorm blocks (``h = LN(h + attn(h))``, ``h = LN(h + mlp(h))``), GELU (erf) MLPs
with biases, absolute position and token-type embeddings, non-causal attention. The
MLP width and head count of each layer follow the budget, as in the causal LM.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flextron_kernels.models.config import FlextronConfig
from flextron_kernels.models.modeling import Budget, ElasticBudgets
from flextron_kernels.nn import ElasticAttention, ElasticMLP
from flextron_kernels.ops.checks import skip_width_value_checks


class EncoderBlock(nn.Module):
    def __init__(self, config: FlextronConfig):
        super().__init__()
        d = config.d_model
        self.attn = ElasticAttention(d, config.q_heads, config.kv_heads, config.head_dim, qkv_bias=True, out_bias=True,
                                     rotary=False, causal=False)
        self.norm1 = nn.LayerNorm(d, eps=config.norm_eps)
        self.mlp = ElasticMLP(d, config.ffn, gated=False, activation="gelu", bias=True)
        self.norm2 = nn.LayerNorm(d, eps=config.norm_eps)

    def forward(self, h, *, heads, width, cu_seqlens):
        h = self.norm1(h + self.attn(h, heads=heads, cu_seqlens=cu_seqlens))
        return self.norm2(h + self.mlp(h, width=width))


class FlextronEncoder(ElasticBudgets, nn.Module):
    """Elastic BERT encoder. ``forward`` returns the last hidden states ``[B, S, D]``
    (zero at padding); :meth:`encode` pools them into sentence embeddings."""

    def __init__(self, config: FlextronConfig, *, pooler: bool = True):
        super().__init__()
        if config.arch != "bert":
            raise ValueError(f"config.arch: expected 'bert' for an encoder, got {config.arch!r}")
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos_embed = nn.Embedding(config.max_positions, d)
        self.type_embed = nn.Embedding(max(config.type_vocab_size, 1), d)
        self.embed_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.layers = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layers))
        self.pooler = nn.Linear(d, d) if pooler else None
        self.budget = 1.0

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, *, budget: Budget = None) -> torch.Tensor:
        """``input_ids [B, S]``; ``attention_mask [B, S]`` with each row's ones first (right
        padding; default all ones); ``budget``: float or ``[B]`` tensor."""
        batch, seq_len = input_ids.shape
        device = input_ids.device
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lengths = mask.sum(1)
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        cu[1:] = lengths.cumsum(0)
        positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        h = self.embed(input_ids) + self.pos_embed(positions) + self.type_embed(types)
        h = self.embed_norm(h)[mask]  # packed [T, D]
        num_tokens = h.shape[0]
        choices = self.layer_choices(budget)
        # cu_seqlens, widths and head counts are built here from the mask and the choice
        # lists: the layers' ops skip their value checks (a host sync per op and layer on a GPU).
        with skip_width_value_checks():
            for layer, (width, heads) in zip(self.layers, choices):
                if isinstance(width, torch.Tensor):
                    width = width.repeat_interleave(lengths, output_size=num_tokens)
                    heads = heads.repeat_interleave(lengths, output_size=num_tokens)
                h = layer(h, heads=heads, width=width, cu_seqlens=cu)
        out = h.new_zeros(batch, seq_len, h.shape[-1])
        out[mask] = h
        return out

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
               budget: Budget = None, pooling: str = "mean") -> torch.Tensor:
        """Sentence embeddings ``[B, D]``: ``mean`` over the tokens, ``cls`` (the first
        token), or ``pooler`` (BERT's tanh pooler on the first token)."""
        hidden = self.forward(input_ids, attention_mask, budget=budget)
        if pooling == "mean":
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            mask = mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "pooler" and self.pooler is not None:
            return torch.tanh(self.pooler(hidden[:, 0]))
        raise ValueError(f"pooling: expected one of mean, cls{', pooler' if self.pooler is not None else ''}, got {pooling!r}")

    @staticmethod
    def from_hf(model_or_path, calibration=None, **kwargs) -> "FlextronEncoder":
        """Convert a Hugging Face ``BertModel`` (see :func:`flextron_kernels.models.convert.encoder_from_hf`)."""
        from flextron_kernels.models.convert import encoder_from_hf

        return encoder_from_hf(model_or_path, calibration, **kwargs)
