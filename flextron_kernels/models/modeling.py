"""FlextronForCausalLM: a decoder-only transformer whose layers run at budget-chosen widths.

The model layer holds no kernel code: it composes :class:`~flextron_kernels.nn.ElasticAttention`
and :class:`~flextron_kernels.nn.ElasticMLP`. Sequences are packed (``[T]`` tokens with
``cu_seqlens``); a budget (float, or one per sequence) picks each layer's MLP width and
query-head count from the layer's choice lists.

Budget policy without a trained router: for a budget ``b``, each layer takes the
largest choice whose fraction of the full size is at most ``b`` (the smallest choice
when none is), so a budget is an upper bound on every layer's width fraction.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from flextron_kernels.models.config import FlextronConfig
from flextron_kernels.models.graphs import capture
from flextron_kernels.models.routers import StaticRouter, TokenRouter, encode_budget, select
from flextron_kernels.nn import ElasticAttention, ElasticMLP, KVCache
from flextron_kernels.nn.attention import extend_positions
from flextron_kernels.nn.norm import RMSNorm
from flextron_kernels.ops.checks import (
    FLOAT_DTYPES,
    INTEGER_DTYPES,
    check_cu_seqlens_values,
    check_tensor,
    host_values,
    skip_width_value_checks,
    value_checks_enabled,
)
from flextron_kernels.ops.elastic_attention import one_sequence

Budget = Union[None, float, torch.Tensor]


class FlextronBlock(nn.Module):
    """Pre-norm transformer block: ``h + attn(norm1(h))``, then ``h + mlp(norm2(h))``."""

    def __init__(self, config: FlextronConfig, index: int = 0):
        super().__init__()
        llama = config.arch == "llama"
        d = config.d_model
        ffn, heads = config.layer_ffn(index), config.layer_heads(index)
        norm = (lambda: RMSNorm(d, config.norm_eps)) if llama else (lambda: nn.LayerNorm(d, eps=config.norm_eps))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = ElasticAttention(
            d, heads, heads // config.group, config.head_dim, qkv_bias=config.qkv_bias or not llama,
            out_bias=config.out_bias or not llama, rotary=llama, rope_theta=config.rope_theta,
            rope_scaling=config.rope_scaling, qk_norm_eps=config.norm_eps if config.qk_norm else None,
            window=config.layer_window(index),
        )
        self.mlp = ElasticMLP(d, ffn, gated=llama, activation="silu" if llama else "gelu_tanh", bias=not llama)

    def forward(self, h, *, heads, width, cu_seqlens, positions, cache=None, attn_scale=None, mlp_scale=None,
                token_router=None, rotary=None):
        """``attn_scale`` / ``mlp_scale``: per-token factors on the attention and MLP
        outputs (the routers' straight-through gradients); ``token_router``: a callable
        ``x -> (width, scale)`` choosing each token's MLP width from its normed state;
        ``rotary``: the positions' rotary tables, shared by the layers."""
        attn = self.attn(self.norm1(h), heads=heads, cu_seqlens=cu_seqlens, positions=positions, cache=cache,
                         rotary=rotary)
        return self._mlp(self._add_scaled(h, attn, attn_scale), width, mlp_scale, token_router)

    def decode(self, h, cache, *, heads, width, token_router=None, rotary=None):
        return self._mlp(h + self.attn.decode(self.norm1(h), cache, heads=heads, rotary=rotary), width, None,
                         token_router)

    def extend(self, h, cache, *, cu_seqlens, heads, width, token_router=None, rotary=None):
        """``heads`` per request (int or ``[B]``), ``width`` per token (int or ``[T]``)."""
        return self._mlp(h + self.attn.extend(self.norm1(h), cache, cu_seqlens=cu_seqlens, heads=heads, rotary=rotary),
                         width, None, token_router)

    @staticmethod
    def _add_scaled(h, update, scale):
        return h + (update if scale is None else update * scale.unsqueeze(-1).to(update.dtype))

    def _mlp(self, h, width, scale, token_router):
        x = self.norm2(h)
        if token_router is not None:
            width, router_scale = token_router(x)
            scale = router_scale if scale is None else scale * router_scale
        return h + self.mlp(x, width=width, scale=scale)


class ElasticBudgets:
    """Budget handling shared by the elastic models: a default budget and the uniform
    per-layer choice policy (see the module docstring). Needs ``self.config``."""

    budget: float = 1.0

    def set_budget(self, budget: float) -> None:
        """The budget used when a call gives none (``b`` in (0, 1])."""
        self.budget = _check_budget(budget)

    def layer_choices(self, budget: Budget) -> list[tuple]:
        """Per layer ``(mlp_width, heads)``: ints for a float budget, ``[B]`` tensors for a
        per-sequence budget tensor."""
        return self._layer_choices(_check_budget(self.budget if budget is None else budget))

    def _layer_choices(self, budget) -> list[tuple]:
        """:meth:`layer_choices` for a budget already checked."""
        choices = []
        cfg = self.config
        for i, (widths, heads) in enumerate(zip(cfg.mlp_choices, cfg.head_choices)):
            choices.append((_pick(widths, cfg.layer_ffn(i), budget), _pick(heads, cfg.layer_heads(i), budget)))
        return choices


class FlextronForCausalLM(ElasticBudgets, nn.Module):
    """Elastic causal LM (Llama family or GPT-2). ``forward`` returns logits."""

    def __init__(self, config: FlextronConfig):
        super().__init__()
        if config.arch not in ("llama", "gpt2"):
            raise ValueError(f"config.arch: expected 'llama' or 'gpt2' for a causal LM, got {config.arch!r}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_positions, config.d_model) if config.arch == "gpt2" else None
        self.layers = nn.ModuleList(FlextronBlock(config, i) for i in range(config.n_layers))
        self.final_norm = (
            RMSNorm(config.d_model, config.norm_eps) if config.arch == "llama" else nn.LayerNorm(config.d_model, eps=config.norm_eps)
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.budget = 1.0
        self.static_router: Optional[StaticRouter] = None
        self.token_routers: Optional[nn.ModuleList] = None
        self.router_tau = 1.0  # Gumbel-softmax temperature in training (annealed by the trainer)
        self.router_settings: Optional[dict] = None
        self.token_router_probs: list = []  # per layer [T, C], filled by a training forward
        self.record_token_choices = False  # when set, an inference forward keeps each layer's choice indices:
        self.token_router_choices: list = []  # per layer [T] (for measuring the routes' latency)

    def attach_routers(self, budgets=(0.25, 0.5, 0.75, 1.0), *, static: bool = True, token: bool = False,
                       hidden: int = 256) -> None:
        """Add a :class:`StaticRouter` (per-layer MLP widths and heads from the budget)
        and/or one :class:`TokenRouter` per layer (per-token MLP widths), trained on
        ``budgets``. Once attached they make the choices; a token router overrides the
        static router's MLP width."""
        cfg = self.config
        p = self.embed.weight
        n_mlp = {len(c) for c in cfg.mlp_choices}
        n_heads = {len(c) for c in cfg.head_choices}
        if len(n_mlp) != 1 or len(n_heads) != 1:
            raise ValueError("attach_routers: every layer needs the same number of choices")
        self.router_settings = dict(budgets=sorted(budgets), static=static, token=token, hidden=hidden)
        if static:
            self.static_router = StaticRouter(budgets, cfg.n_layers, n_mlp.pop(), n_heads.pop(), hidden).to(p.device)
        if token:
            self.token_routers = nn.ModuleList(
                TokenRouter(cfg.d_model, len(budgets), len(c), hidden) for c in cfg.mlp_choices
            ).to(p.device)
            self.register_buffer("router_budgets", torch.tensor(sorted(budgets), dtype=torch.float32, device=p.device))

    # ------------------------------------------------------------------ budgets
    def load_latency_table(self, table) -> None:
        """Use a latency table (a path or a ``LatencyTable`` from ``flextron bench --lut``) in :meth:`cost`."""
        from flextron_kernels.bench.latency_table import LatencyTable

        self.latency_table = table if isinstance(table, LatencyTable) else LatencyTable.load(table)

    def cost(self, budget: Budget = None, *, phase: str = "prefill", tokens: int = 1) -> dict:
        """At a float budget: parameters used per token, matmul FLOPs per token (2 per
        multiply-add, attention scores excluded), and, once a latency table is loaded,
        the estimated latency in ms of the layers' MLPs and attention for ``tokens``
        tokens in ``phase`` (``prefill`` or ``decode``)."""
        budget = _check_budget(self.budget if budget is None else budget)
        cfg = self.config
        params = 0
        latency = 0.0
        table = getattr(self, "latency_table", None)
        for width, heads in self._layer_choices(budget):
            kv = heads // cfg.group
            params += cfg.d_model * cfg.head_dim * (2 * heads + 2 * kv)  # q, o; k, v
            params += cfg.d_model * width * (3 if cfg.arch == "llama" else 2)
            if table is not None:
                latency += table.latency("mlp", width, phase, tokens) + table.latency("attention", heads, phase, tokens)
        params += cfg.d_model * cfg.vocab_size  # lm head
        result = {"budget": budget, "params_per_token": params, "flops_per_token": 2 * params}
        if table is not None:
            result["latency_ms"] = latency
        return result

    def _plan(self, budget: Budget, num_seqs: int, device) -> list[dict]:
        """Per layer: ``width``, ``heads`` (ints, or ``[B]`` tensors), and the static
        router's straight-through ``mlp_scale`` / ``attn_scale`` (``[B]``, training only)."""
        budget = _check_budget(self.budget if budget is None else budget)
        if self.static_router is None:
            return [dict(width=w, heads=h, mlp_scale=None, attn_scale=None) for w, h in self._layer_choices(budget)]
        per_seq = budget.to(device).float() if isinstance(budget, torch.Tensor) else torch.full((num_seqs,), budget, device=device)
        mlp_logits, head_logits = self.static_router(per_seq)
        mlp_index, mlp_scale = select(mlp_logits, training=self.training, tau=self.router_tau)
        head_index, head_scale = select(head_logits, training=self.training, tau=self.router_tau)
        if not self.training and not isinstance(budget, torch.Tensor):  # one choice for all: static widths
            rows = zip(mlp_index[0].tolist(), head_index[0].tolist())
            return [dict(width=mc[m], heads=hc[h], mlp_scale=None, attn_scale=None)
                    for (m, h), mc, hc in zip(rows, self.config.mlp_choices, self.config.head_choices)]
        plan = []
        for i, (mc, hc) in enumerate(zip(self.config.mlp_choices, self.config.head_choices)):
            plan.append(dict(
                width=_constant(mc, device)[mlp_index[:, i]],
                heads=_constant(hc, device)[head_index[:, i]],
                mlp_scale=mlp_scale[:, i] if self.training else None,
                attn_scale=head_scale[:, i] if self.training else None,
            ))
        return plan

    def _token_router(self, layer: int, budget_code: torch.Tensor):
        """A callable ``x -> (width [T], scale [T])`` for layer ``layer``'s token router."""
        choices = _constant(self.config.mlp_choices[layer], budget_code.device)

        def route(x):
            # The router reads the hidden state without sending its own losses (latency, the
            # pull to full width) back into the model; the LM loss reaches it through the scale.
            logits = self.token_routers[layer](x.detach(), budget_code)
            index, scale = select(logits, training=self.training, tau=self.router_tau)
            if self.training:  # for the trainer's latency loss: each token's choice probabilities
                self.token_router_probs.append(torch.softmax(logits.float(), -1))
            elif self.record_token_choices:
                self.token_router_choices.append(index)
            return choices[index], (scale if self.training else None)

        return route

    def _budget_code(self, budget: Budget, per_token_count, repeat) -> Optional[torch.Tensor]:
        if self.token_routers is None:
            return None
        budget = self.budget if budget is None else budget
        device = self.router_budgets.device
        per_seq = budget.to(device).float() if isinstance(budget, torch.Tensor) else torch.full((per_token_count,), float(budget), device=device)
        return encode_budget(repeat(per_seq), self.router_budgets)

    # ------------------------------------------------------------------ save, load, export
    @staticmethod
    def from_hf(model_or_path, calibration=None, **kwargs) -> "FlextronForCausalLM":
        """Convert a Hugging Face causal LM (see :func:`flextron_kernels.models.convert.from_hf`)."""
        from flextron_kernels.models.convert import from_hf

        return from_hf(model_or_path, calibration, **kwargs)

    def save_pretrained(self, path, *, state_dict=None):
        """``config.json`` + ``model.safetensors`` (weights, permutations, choices, routers)."""
        from flextron_kernels.models.io import save_pretrained

        return save_pretrained(self, path, state_dict=state_dict)

    @staticmethod
    def from_pretrained(path, *, device=None) -> "FlextronForCausalLM":
        from flextron_kernels.models.io import from_pretrained

        return from_pretrained(path, device=device)

    def export_sliced(self, budget: float, path):
        """The sub-network at ``budget`` as a smaller Flextron checkpoint (heterogeneous
        per-layer choices kept; see :func:`flextron_kernels.models.io.export_sliced`)."""
        from flextron_kernels.models.io import export_sliced

        return export_sliced(self, budget, path)

    def export_hf(self, budget: float, path, *, model_type=None):
        """A dense Hugging Face checkpoint of the sub-network at ``budget`` (see
        :func:`flextron_kernels.models.io.export_hf`)."""
        from flextron_kernels.models.io import export_hf

        return export_hf(self, budget, path, model_type=model_type)

    # ------------------------------------------------------------------ forward
    def _pack(self, input_ids, cu_seqlens):
        if input_ids.dim() == 2:
            batch, seq_len = input_ids.shape
            cu = torch.arange(batch + 1, device=input_ids.device, dtype=torch.int32) * seq_len
            return input_ids.reshape(-1), cu
        if cu_seqlens is None:
            cu_seqlens = one_sequence(input_ids.numel(), input_ids.device)
        return input_ids, cu_seqlens.to(torch.int32)

    def _check_packing(self, input_ids: torch.Tensor, cu: torch.Tensor, *, given: bool,
                       caches: Optional[list]) -> None:
        """``cu_seqlens`` (when the caller gave it) and the caches to fill, checked once
        for every layer. Values are read on the host at most once (a sync on a GPU), and
        not where the ops skip their value checks (:func:`~flextron_kernels.skip_width_value_checks`,
        graph capture, compile)."""
        num_seqs, num_tokens = cu.numel() - 1, input_ids.numel()
        if caches is not None and (len(caches) != len(self.layers) or any(c.k.shape[0] != num_seqs for c in caches)):
            raise ValueError(
                f"caches: expected one cache per layer ({len(self.layers)}) with one request per sequence "
                f"({num_seqs}), got {len(caches)} caches of batch {[c.k.shape[0] for c in caches][:4]}"
            )
        if not given:  # [B, S] or one packed sequence: the longest is known on the host
            longest = input_ids.shape[-1] if input_ids.dim() == 2 else num_tokens
        elif value_checks_enabled(cu):
            values = cu.tolist()
            check_cu_seqlens_values(values, num_tokens)
            longest = max((b - a for a, b in zip(values, values[1:])), default=0)
        else:
            return
        self.config.check_positions(longest, "input_ids (its longest sequence)")
        too_short = [c.k.shape[2] for c in (caches or ()) if c.k.shape[2] < longest]
        if too_short:
            raise ValueError(f"caches: a sequence of {longest} tokens does not fit caches of {too_short[0]} positions")

    def _per_token(self, value, cu_seqlens, num_tokens):
        if not isinstance(value, torch.Tensor):
            return value
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
        return value.repeat_interleave(lengths, output_size=num_tokens)

    def forward(self, input_ids: torch.Tensor, *, budget: Budget = None, cu_seqlens: Optional[torch.Tensor] = None,
                caches: Optional[list] = None, choices: Optional[list] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for ``input_ids`` ``[B, S]`` (logits ``[B, S, V]``) or packed ``[T]`` with
        ``cu_seqlens [B + 1]`` (logits ``[T, V]``). ``budget``: a float in (0, 1] or a
        ``[B]`` tensor (one per sequence); default the model's (:meth:`set_budget`).
        ``caches``: one :class:`KVCache` per layer to fill (prefill before decoding).
        ``choices``: per layer ``(mlp_width, heads)``, overriding the budget and routers.
        ``attention_mask [B, S]`` (with ``[B, S]`` ids): 1 for a token, 0 for padding; each
        row's tokens run as one sequence (positions from 0, pads never attended; packed, so
        pads cost nothing) and the logits at pads are zeros."""
        if input_ids.dim() == 2 and input_ids.shape[0] == 0:  # an empty batch: no sequence to run
            return self.embed.weight.new_zeros(*input_ids.shape, self.config.vocab_size)
        if attention_mask is not None:
            if input_ids.dim() != 2 or cu_seqlens is not None:
                raise ValueError(f"attention_mask: expected with input_ids [B, S] and no cu_seqlens, got input_ids of "
                                 f"shape {tuple(input_ids.shape)} and cu_seqlens {'given' if cu_seqlens is not None else 'None'}")
            ids, cu, _ = _pack_by_mask(input_ids, attention_mask)
            packed = self.forward(ids, cu_seqlens=cu, budget=budget, caches=caches, choices=choices)
            logits = packed.new_zeros(*input_ids.shape, packed.shape[-1])
            logits[attention_mask != 0] = packed
            return logits
        shape = input_ids.shape
        if cu_seqlens is not None:
            check_tensor("cu_seqlens", cu_seqlens, dtypes=INTEGER_DTYPES, ndim=1, device=input_ids.device)
            if cu_seqlens.numel() < 2:
                raise ValueError(f"cu_seqlens: expected at least 2 entries (B + 1), got {cu_seqlens.numel()}")
        ids, cu = self._pack(input_ids, cu_seqlens)
        num_tokens = ids.numel()
        self._check_budget_shape(budget, cu.numel() - 1)
        if choices is not None:
            self._check_choices(choices, cu.numel() - 1, ids.device)
        self._check_packing(input_ids, cu, given=cu_seqlens is not None, caches=caches)
        seq_ids = torch.bucketize(torch.arange(num_tokens, device=ids.device), cu[1:].to(torch.int64), right=True)
        positions = torch.arange(num_tokens, device=ids.device) - cu.to(torch.int64)[seq_ids]
        h = self.embed(ids)
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)
        num_seqs = cu.numel() - 1

        def per_token(value):
            return self._per_token(value, cu, num_tokens)

        code = self._budget_code(budget, num_seqs, per_token)
        self.token_router_probs, self.token_router_choices = [], []
        if choices is not None:
            plans = [dict(width=w, heads=h, mlp_scale=None, attn_scale=None) for w, h in choices]
            code = None
        else:
            plans = self._plan(budget, num_seqs, ids.device)
        rotary = self.layers[0].attn.rotary_tables(positions, h.dtype) if self.layers else None
        # The packing was checked above, and widths and head counts made from the choice
        # lists are valid: the layers' ops skip their value checks (on a GPU, a host sync
        # per op and layer). Choices given by the caller are checked by each op.
        with skip_width_value_checks() if choices is None else contextlib.nullcontext():
            for i, (layer, plan) in enumerate(zip(self.layers, plans)):
                h = layer(
                    h, heads=per_token(plan["heads"]), width=per_token(plan["width"]),
                    cu_seqlens=cu, positions=positions, cache=None if caches is None else caches[i],
                    attn_scale=per_token(plan["attn_scale"]), mlp_scale=per_token(plan["mlp_scale"]),
                    token_router=None if code is None else self._token_router(i, code), rotary=rotary,
                )
        logits = self.lm_head(self.final_norm(h))
        return logits.reshape(*shape, logits.shape[-1]) if input_ids.dim() == 2 else logits

    def decode_step(self, tokens: torch.Tensor, caches: list, *, budget: Budget = None,
                    choices: Optional[list] = None) -> torch.Tensor:
        """One token per request (``tokens [B]``) against filled caches: logits ``[B, V]``.

        ``budget``: a float or ``[B]`` tensor, as in :meth:`forward`. ``choices``: per layer
        ``(mlp_width, heads)``, ints or ``[B]`` tensors, overriding the budget and routers
        (a serving loop computes them once per request; see :meth:`choices_for`). With
        ``choices`` (or a ``[B]`` budget and no static router), a step has no host sync
        and can be captured in a CUDA graph."""
        if tokens.dim() != 1 or len(caches) != len(self.layers) or tokens.shape[0] != caches[0].k.shape[0]:
            raise ValueError(
                f"decode_step: expected tokens [B] and one cache per layer ({len(self.layers)}) holding B requests; got "
                f"tokens of shape {tuple(tokens.shape)} and {len(caches)} caches of batch "
                f"{caches[0].k.shape[0] if caches else '-'} (new_caches(batch, max_len) makes them)"
            )
        if choices is not None:  # on the host only where value checks run (not in a replayed step)
            self._check_choices(choices, tokens.shape[0], tokens.device)
        h = self.embed(tokens)
        positions = caches[0].seqlens.to(torch.int64)  # every layer's cache holds the same lengths
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)
        rotary = self.layers[0].attn.rotary_tables(positions, h.dtype)
        if choices is not None:
            plans, code = [dict(width=w, heads=hd) for w, hd in choices], None
        else:
            plans = self._plan(budget, tokens.shape[0], tokens.device)
            code = self._budget_code(budget, tokens.shape[0], lambda b: b)
        for i, (layer, cache, plan) in enumerate(zip(self.layers, caches, plans)):
            h = layer.decode(h, cache, heads=plan["heads"], width=plan["width"],
                             token_router=None if code is None else self._token_router(i, code), rotary=rotary)
        return self.lm_head(self.final_norm(h))

    def extend(self, input_ids: torch.Tensor, caches: list, *, budget: Budget = None,
               cu_seqlens: Optional[torch.Tensor] = None, choices: Optional[list] = None) -> torch.Tensor:
        """Logits for new tokens that continue each request's cache (a later chunk of a long
        prompt, the next turn of a chat): ``input_ids [B, S]`` (``S`` new tokens per
        request; logits ``[B, S, V]``) or packed ``[T]`` with ``cu_seqlens [B + 1]``
        (logits ``[T, V]``; a request may have none). The tokens go after the
        ``caches[i].seqlens[b]`` positions each cache holds, which advance by them.
        ``budget`` / ``choices`` as in :meth:`forward`; a request's head counts must be
        those its cache was filled with (the same budget does that). Equal, up to
        rounding, to the logits of one prefill over the whole sequences."""
        if cu_seqlens is not None:
            check_tensor("cu_seqlens", cu_seqlens, dtypes=INTEGER_DTYPES, ndim=1, device=input_ids.device)
        ids, cu = self._pack(input_ids, cu_seqlens)
        num_seqs, num_tokens = cu.numel() - 1, ids.numel()
        self._check_budget_shape(budget, num_seqs)
        if choices is not None:
            self._check_choices(choices, num_seqs, ids.device)
        self._check_caches_batch(caches, num_seqs)
        self.token_router_probs, self.token_router_choices = [], []

        def per_token(value):
            return self._per_token(value, cu, num_tokens)

        if choices is not None:
            plans, code = [dict(width=w, heads=hd) for w, hd in choices], None
        else:
            plans = self._plan(budget, num_seqs, ids.device)
            code = self._budget_code(budget, num_seqs, per_token)
        # Every layer's arguments checked before any cache changes (a failure halfway would
        # leave the layers' caches at different lengths): their values in one copy.
        self._check_extension(caches, cu, num_tokens, [
            layer.attn.extension_checks(cache, cu, plan["heads"], num_tokens)
            for layer, cache, plan in zip(self.layers, caches, plans)])
        if num_tokens == 0:
            return self.embed.weight.new_zeros(*input_ids.shape, self.config.vocab_size)
        _, positions = extend_positions(caches[0].seqlens, cu, num_tokens)
        h = self.embed(ids)
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)
        rotary = self.layers[0].attn.rotary_tables(positions, h.dtype)
        with skip_width_value_checks():
            for i, (layer, cache, plan) in enumerate(zip(self.layers, caches, plans)):
                h = layer.extend(h, cache, cu_seqlens=cu, heads=plan["heads"], width=per_token(plan["width"]),
                                 token_router=None if code is None else self._token_router(i, code), rotary=rotary)
        logits = self.lm_head(self.final_norm(h))
        return logits.reshape(*input_ids.shape, logits.shape[-1]) if input_ids.dim() == 2 else logits

    def _check_caches_batch(self, caches: list, num_seqs: int) -> None:
        if not isinstance(caches, (list, tuple)) or len(caches) != len(self.layers) or any(
                c.k.shape[0] != num_seqs for c in caches):
            raise ValueError(
                f"caches: expected one cache per layer ({len(self.layers)}) with one request per sequence "
                f"({num_seqs}), got {len(caches)} caches of batch {[c.k.shape[0] for c in caches][:4]}"
            )

    def _check_extension(self, caches: list, cu: torch.Tensor, num_tokens: int, layer_checks: list) -> None:
        """The values an :meth:`extend` relies on, from one copy to the host: the same
        lengths in every layer's cache, the model's positions, and each layer's checks
        (``layer_checks``: :meth:`ElasticAttention.extension_checks` per layer)."""
        if not (cu.numel() > 1 and value_checks_enabled(cu)):
            return
        lengths = torch.stack([c.seqlens.to(torch.int64) for c in caches])  # [layers, B]
        summaries = [(lengths != lengths[0]).any()[None]] + [t for layer, _ in layer_checks for t in layer]
        values = host_values(*summaries)
        first = values[1:1 + len(layer_checks[0][0])]
        check_cu_seqlens_values(first[0], num_tokens)
        if values[0][0]:
            raise ValueError("caches: expected every layer's cache to hold the same lengths (the caches of one model's "
                             "requests), got layers that differ")
        room, longest = min(c.k.shape[2] for c in caches), max(first[1], default=0)
        if longest > room:
            raise ValueError(f"caches: a request would hold {longest} positions after this extension, past the "
                             f"caches' {room} (new_caches(batch, max_len) makes longer ones)")
        self.config.check_positions(longest, "the caches' lengths after the extension")
        index = 1
        for layer, check_values in layer_checks:
            check_values(values[index:index + len(layer)])
            index += len(layer)

    @staticmethod
    def _check_budget_shape(budget: Budget, num_seqs: int) -> None:
        if isinstance(budget, torch.Tensor) and budget.numel() != num_seqs:
            raise ValueError(f"budget: expected one value per sequence ({num_seqs}), got shape {tuple(budget.shape)}")

    def _check_choices(self, choices: list, num_seqs: int, device) -> None:
        """``choices``: per layer ``(mlp_width, heads)``, each an int or a ``[B]`` integer
        tensor, widths in ``[0, F]`` and head counts in ``[0, Hq]``, multiples of the GQA
        group; values from one copy to the host."""
        if not isinstance(choices, (list, tuple)) or len(choices) != len(self.layers):
            raise ValueError(f"choices: expected one (mlp_width, heads) pair per layer ({len(self.layers)}), got "
                             f"{len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__}")
        bounds, summaries = [], []
        for i, choice in enumerate(choices):
            if not isinstance(choice, (list, tuple)) or len(choice) != 2:
                raise ValueError(f"choices[{i}]: expected a pair (mlp_width, heads), got {choice!r}")
            for name, value, high in (("mlp_width", choice[0], self.config.layer_ffn(i)),
                                      ("heads", choice[1], self.config.layer_heads(i))):
                where = f"choices[{i}] {name}"
                if isinstance(value, torch.Tensor):
                    check_tensor(where, value, dtypes=INTEGER_DTYPES, shape=(num_seqs,), device=device)
                    if num_seqs and value_checks_enabled(value):
                        summaries.append(torch.stack([value.min(), value.max(), (value % self.config.group).max()
                                                      if name == "heads" else value.new_zeros(())]))
                        bounds.append((where, high, name == "heads"))
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                    raise ValueError(f"{where}: expected an int in [0, {high}] or a ({num_seqs},) tensor, got {value!r}")
                if name == "heads" and value % self.config.group:
                    raise ValueError(f"{where}: expected a multiple of the GQA group size {self.config.group}, got {value}")
        for (where, high, heads), (low, top, off) in zip(bounds, host_values(*summaries) if summaries else []):
            if low < 0 or top > high:
                raise ValueError(f"{where}: expected values in [0, {high}], got values in [{low}, {top}]")
            if heads and off:
                raise ValueError(f"{where}: expected multiples of the GQA group size {self.config.group}")

    @torch.no_grad()
    def choices_for(self, budget: float) -> list[tuple[int, int]]:
        """Per layer ``(mlp_width, heads)`` that inference runs at a float ``budget``: the
        static router's choice when one is attached, else the uniform policy."""
        budget = _check_budget(budget)
        if self.static_router is None:
            return self._layer_choices(budget)
        training = self.training
        self.eval()
        try:
            plan = self._plan(budget, 1, self.embed.weight.device)
        finally:
            self.train(training)
        return [(p["width"], p["heads"]) for p in plan]

    def new_caches(self, batch: int, max_len: int) -> list:
        """Empty per-layer KV caches ``[batch, Hkv, max_len, Dh]`` in the model's dtype."""
        p = self.embed.weight
        cfg = self.config
        cfg.check_positions(max_len, "max_len")
        return [KVCache.empty(batch, layer.attn.kv_heads, max_len, cfg.head_dim, device=p.device, dtype=p.dtype)
                for layer in self.layers]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
                 budget: Budget = None, max_new_tokens: int = 20,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 cuda_graph: Optional[bool] = None, caches: Optional[list] = None) -> torch.Tensor:
        """Continue each prompt of ``input_ids [B, S]``; returns ``[B, S + max_new_tokens]``.

        ``attention_mask [B, S]`` (1 for a token, 0 for padding, as a Hugging Face tokenizer
        pads a batch): prompts of different lengths, padded on the left (or the right); each
        prompt is its tokens alone (positions from 0, pads never attended), and the new tokens
        follow the whole padded row, as in ``transformers``' ``generate``.
        Packed prefill fills a KV cache, then one decode step per token. ``budget``: a
        float or ``[B]`` tensor (each request its own). ``temperature`` 0 is greedy;
        otherwise sampling with optional ``top_k`` / ``top_p``. After ``eos_token_id`` a
        request keeps emitting it. ``cuda_graph``: the first decode step runs eagerly and
        is captured in a CUDA graph that the later steps replay, when at least four
        follow (default: on a GPU, unless :attr:`record_token_choices` is set, whose
        record a replay would not extend). ``caches``: the requests' caches from an
        earlier call (:meth:`new_caches`, filled by :meth:`forward`, :meth:`extend` or
        ``generate``) to continue, as a chat's next turn continues the conversation: the
        prompts extend them (:meth:`extend`) and, when this returns, they hold every
        returned token; use the same budget. Default: fresh caches for this call alone.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected [B, S] with S >= 1, got shape {tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not hasattr(max_new_tokens, "__index__") or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if cuda_graph and not input_ids.is_cuda:
            raise ValueError(f"cuda_graph: CUDA graphs need input_ids and the model on a CUDA device, got {input_ids.device}")
        if cuda_graph is None:
            cuda_graph = input_ids.is_cuda and not self.record_token_choices
        batch, prompt_len = input_ids.shape
        packed = None if attention_mask is None else _pack_by_mask(input_ids, attention_mask)
        total = (prompt_len if packed is None else packed[2]) + max_new_tokens
        budget = self.budget if budget is None else budget
        if isinstance(budget, torch.Tensor):  # on the device once: a captured step cannot copy from the host
            budget = budget.to(input_ids.device)
        continued = caches is not None
        if continued:  # the prompts extend the caches; the new tokens need room after them
            self._check_caches_batch(caches, batch)
            held = int(caches[0].seqlens.max()) if batch else 0
            self.config.check_positions(held + total, "the caches' lengths + prompt length + max_new_tokens")
            room = min(c.k.shape[2] for c in caches)
            if room < held + total:
                raise ValueError(f"caches: {room} positions, too few for the {held} a request holds, "
                                 f"its prompt and max_new_tokens ({held + total} in all)")
            prefill = self.extend
        else:
            self.config.check_positions(total, "prompt length + max_new_tokens")
            caches = self.new_caches(batch, total)
            prefill = self.forward
        if packed is None:
            logits = prefill(input_ids, caches=caches, budget=budget)[:, -1]
        else:
            ids, cu, _ = packed
            logits = prefill(ids, cu_seqlens=cu, budget=budget, caches=caches)[cu[1:].to(torch.int64) - 1]
        if self.token_routers is not None or self.training:  # choices made inside each step
            step_args = dict(budget=budget)
        else:  # the same choices at every step: made once (a static router's is a host sync)
            step_args = dict(choices=[(p["width"], p["heads"]) for p in self._plan(budget, batch, input_ids.device)])
        tokens = torch.zeros(batch, dtype=torch.long, device=input_ids.device)  # the decode step's input

        def decode_step():
            return self.decode_step(tokens, caches, **step_args)

        captured = None  # (graph, logits) once a decode step is captured
        try_capture = cuda_graph
        out = [input_ids]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = _sample(logits.float(), temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(finished, eos_token_id, token)
                finished |= token == eos_token_id
            out.append(token[:, None])
            if step + 1 == max_new_tokens:
                break
            tokens.copy_(token)
            if captured is not None:
                captured[0].replay()
                logits = captured[1]
                continue
            # The step's inputs were checked by the prefill or are built here (cache
            # lengths within the caches made for `total`): no host sync per layer.
            with skip_width_value_checks():
                logits = decode_step()
            # Kernels compiled now; a capture (a device sync, a few steps' time) pays off over
            # several replays.
            if try_capture and max_new_tokens - step - 2 >= _MIN_GRAPH_REPLAYS:
                captured = capture(decode_step, what="generate's decode step")
            try_capture = False
        if continued and max_new_tokens:  # the caller's caches hold the last token too
            tokens.copy_(out[-1][:, 0])
            with skip_width_value_checks():
                decode_step()
        return torch.cat(out, dim=1)


# Decode steps that must follow for generate to capture one in a CUDA graph.
_MIN_GRAPH_REPLAYS = 4


def _pack_by_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The tokens of ``input_ids [B, S]`` where ``attention_mask`` is 1, packed row after
    row: ``(ids [T], cu_seqlens [B + 1] int32, longest prompt)`` (one host copy)."""
    check_tensor("attention_mask", attention_mask, ndim=2, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype not in (torch.bool, *INTEGER_DTYPES, *FLOAT_DTYPES):
        raise TypeError(f"attention_mask: expected a bool, integer or float tensor of 0 and 1, got {attention_mask.dtype}")
    keep = attention_mask != 0
    lengths = keep.sum(1)
    others = (keep & (attention_mask != 1)).sum()
    others, *counts = torch.cat([others.reshape(1), lengths]).tolist()
    if others:
        raise ValueError(f"attention_mask: expected 0 (padding) and 1 (a token) only, got {others} other values")
    if counts and min(counts) < 1:
        raise ValueError(f"attention_mask: expected at least one token (a 1) in every row, got none in rows "
                         f"{[i for i, c in enumerate(counts) if c < 1][:8]}")
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return input_ids[keep], cu, max(counts, default=0)


@functools.lru_cache(maxsize=None)
def _constant_cached(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device)


def _constant(values, device) -> torch.Tensor:
    """A device tensor of ``values`` (a choice list), made once: a decode step captured in a
    CUDA graph cannot copy from the host."""
    return _constant_cached(tuple(values), torch.device(device))


def _check_budget(budget) -> float:
    if isinstance(budget, torch.Tensor):
        # A host sync: skipped where width values are not checked either (graph capture,
        # torch.compile, skip_width_value_checks()).
        if budget.numel() and value_checks_enabled(budget) and not bool(((budget > 0) & (budget <= 1)).all()):
            raise ValueError(f"budget: expected values in (0, 1], got {budget.tolist()}")
        return budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget: expected a float in (0, 1], got {budget!r}")
    return float(budget)


def _pick(choices: list, full: int, budget) -> Union[int, torch.Tensor]:
    """The largest choice whose fraction of ``full`` is at most ``budget`` (else the smallest);
    ``budget`` already checked."""
    if isinstance(budget, torch.Tensor):
        values = _constant(choices, budget.device)
        fractions = values.double() / full
        index = torch.searchsorted(fractions, budget.double() + 1e-9, right=True) - 1
        return values[index.clamp(min=0)]
    fitting = [c for c in choices if c / full <= budget + 1e-9]
    return fitting[-1] if fitting else choices[0]


def _sample(logits, temperature, top_k, top_p, generator):
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)[:, 0]
