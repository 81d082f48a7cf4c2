"""Conversion of Hugging Face causal LMs into Flextron models, with importance ranking.

Importance (Minitron-style, on calibration batches):
- MLP neuron ``i`` of a layer: ``score_i = sum over tokens |h_i|``, where ``h`` is the
  input of the down projection (``silu(gate) * up`` for SwiGLU, ``gelu(fc)`` for GPT-2).
- Attention head ``h``: ``score_h = sum over tokens ||o_h||_2``, where ``o_h`` is the
  head's attention output (its slice of the output projection's input). Under GQA a KV
  head's score is the sum of its query heads' scores; KV heads are ranked as units and
  query heads within their group.
Rows of the up/gate projections (and columns of the down projection), and the head
blocks of the Q/K/V rows and O columns, are permuted into decreasing score, so every
prefix keeps the most important neurons and heads. At full width the function is
unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from flextron_kernels.models.config import FlextronConfig
from flextron_kernels.models.modeling import FlextronForCausalLM
from flextron_kernels.nn.rotary import check_rope_scaling

SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2"}


def load_hf_model(model_or_path, auto_class: str = "AutoModelForCausalLM", *, dtype=None, device=None):
    """A Hugging Face model object (moved to ``dtype`` and ``device`` where given), or one
    loaded from a local folder (never downloaded) in ``dtype`` (default fp32) on ``device``
    (default the CPU)."""
    if isinstance(model_or_path, (str, Path)):
        import transformers

        loader = getattr(transformers, auto_class)
        hf = loader.from_pretrained(str(model_or_path), local_files_only=True, torch_dtype=dtype or torch.float32)
    else:
        hf = model_or_path
        if dtype is not None:
            hf = hf.to(dtype=dtype)
    return hf.to(device=device) if device is not None else hf


def config_from_hf(hf_config) -> FlextronConfig:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type: expected one of {', '.join(sorted(SUPPORTED))}, got {model_type!r}")
    if SUPPORTED[model_type] == "gpt2":
        # What the GPT-2 blocks compute: a tanh-approximated GELU, scores scaled by 1/sqrt(head size).
        _expect(hf_config, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
        _expect(hf_config, "scale_attn_weights", (True,), True)
        _expect(hf_config, "scale_attn_by_inverse_layer_idx", (False,), False)
        return FlextronConfig(
            arch="gpt2", vocab_size=hf_config.vocab_size, d_model=hf_config.n_embd, n_layers=hf_config.n_layer,
            q_heads=hf_config.n_head, kv_heads=hf_config.n_head, ffn=hf_config.n_inner or 4 * hf_config.n_embd,
            norm_eps=hf_config.layer_norm_epsilon, max_positions=hf_config.n_positions, tie_embeddings=True,
        )
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias: Llama-family MLPs with biases are not supported (got mlp_bias=True)")
    _expect(hf_config, "hidden_act", ("silu", "swish"), "silu")  # the MLP is SwiGLU
    theta, rope_scaling = _rope_from_hf(hf_config)
    return FlextronConfig(
        arch="llama", vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
        q_heads=hf_config.num_attention_heads, kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        ffn=hf_config.intermediate_size, head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        norm_eps=hf_config.rms_norm_eps, rope_theta=float(theta), max_positions=hf_config.max_position_embeddings,
        qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        qk_norm=model_type == "qwen3",
        out_bias=bool(getattr(hf_config, "attention_bias", False)),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        rope_scaling=rope_scaling, **_sliding_window(hf_config),
    )


def _expect(hf_config, name: str, accepted: tuple, default) -> None:
    """A ValueError unless ``hf_config.name`` (``default`` when absent) is among ``accepted``:
    a setting the converted model would not honour is refused, not dropped."""
    value = getattr(hf_config, name, default)
    if value not in accepted:
        raise ValueError(f"{name}: expected {' or '.join(repr(a) for a in accepted)} (what the converted model "
                         f"computes), got {value!r}")


def _rope_from_hf(hf_config) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` of a Llama-family config: transformers 5 keeps both in
    ``rope_parameters``, earlier versions in ``rope_theta`` and ``rope_scaling`` (whose type
    was once named ``type``). Types this package does not compute are a ValueError."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", None) or getattr(hf_config, "partial_rotary_factor", None) or 1.0
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor: expected 1.0 (rotary embeddings over every head dimension), got {partial}")
    if rope_type == "default":
        return theta, None
    if rope_type == "yarn":  # transformers' defaults where the checkpoint omits them
        params.setdefault("original_max_position_embeddings", None)
        params["original_max_position_embeddings"] = (params["original_max_position_embeddings"]
                                                      or hf_config.max_position_embeddings)
        if params.get("factor") is None:
            params["factor"] = hf_config.max_position_embeddings / params["original_max_position_embeddings"]
    scaling = {"rope_type": rope_type, **{k: v for k, v in params.items() if v is not None}}
    try:
        return theta, check_rope_scaling(scaling)
    except ValueError as error:
        raise ValueError("the checkpoint's rope_parameters (rope_scaling before transformers 5): "
                         + str(error).removeprefix("rope_scaling: ")) from None


def _sliding_window(hf_config) -> dict:
    """``sliding_window`` and ``window_layers`` of a Mistral or Qwen2/3 config: the window,
    and the layers that use it (None: every layer)."""
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return {}
    layers = range(hf_config.num_hidden_layers)
    layer_types = getattr(hf_config, "layer_types", None)
    if getattr(hf_config, "model_type", None) == "mistral":  # every layer (it ignores layer_types)
        windowed = list(layers)
    elif layer_types is not None:
        windowed = [i for i in layers if layer_types[i] == "sliding_attention"]
    elif hasattr(hf_config, "use_sliding_window"):  # Qwen2 in transformers < 5: the layers from max_window_layers
        windowed = [i for i in layers if hf_config.use_sliding_window and i >= hf_config.max_window_layers]
    else:  # Mistral in transformers < 5: every layer
        windowed = list(layers)
    if not windowed:
        return {}
    return dict(sliding_window=int(window), window_layers=None if len(windowed) == len(layers) else windowed)


@torch.no_grad()
def _copy_weights(model: FlextronForCausalLM, hf) -> None:
    cfg = model.config
    if cfg.arch == "gpt2":
        base = hf.transformer
        model.embed.weight.copy_(base.wte.weight)
        model.pos_embed.weight.copy_(base.wpe.weight)
        d = cfg.d_model
        for layer, block in zip(model.layers, base.h):
            layer.norm1.load_state_dict(block.ln_1.state_dict())
            layer.norm2.load_state_dict(block.ln_2.state_dict())
            qkv_w, qkv_b = block.attn.c_attn.weight.T, block.attn.c_attn.bias  # Conv1D stores [in, out]
            for i, proj in enumerate((layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj)):
                proj.weight.copy_(qkv_w[i * d:(i + 1) * d])
                proj.bias.copy_(qkv_b[i * d:(i + 1) * d])
            layer.attn.o_proj.weight.copy_(block.attn.c_proj.weight.T)
            layer.attn.o_proj.bias.copy_(block.attn.c_proj.bias)
            layer.mlp.w_up.copy_(block.mlp.c_fc.weight.T)
            layer.mlp.b_up.copy_(block.mlp.c_fc.bias)
            layer.mlp.w_down.copy_(block.mlp.c_proj.weight.T)
            layer.mlp.b_down.copy_(block.mlp.c_proj.bias)
        model.final_norm.load_state_dict(base.ln_f.state_dict())
        return
    base = hf.model
    model.embed.weight.copy_(base.embed_tokens.weight)
    for layer, block in zip(model.layers, base.layers):
        layer.norm1.weight.copy_(block.input_layernorm.weight)
        layer.norm2.weight.copy_(block.post_attention_layernorm.weight)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ours, theirs = getattr(layer.attn, name), getattr(block.self_attn, name)
            ours.weight.copy_(theirs.weight)
            if ours.bias is not None:
                ours.bias.copy_(theirs.bias)
        if layer.attn.q_norm is not None:
            layer.attn.q_norm.weight.copy_(block.self_attn.q_norm.weight)
            layer.attn.k_norm.weight.copy_(block.self_attn.k_norm.weight)
        layer.mlp.w_gate.copy_(block.mlp.gate_proj.weight)
        layer.mlp.w_up.copy_(block.mlp.up_proj.weight)
        layer.mlp.w_down.copy_(block.mlp.down_proj.weight)
    model.final_norm.weight.copy_(base.norm.weight)
    if not model.config.tie_embeddings:
        model.lm_head.weight.copy_(hf.lm_head.weight)


def _calibration_ids(calibration, tokenizer) -> list:
    """Calibration batches as a list of ``[B, S]`` id tensors."""
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        batches = [calibration if calibration.dim() == 2 else calibration[None]]
    elif isinstance(calibration, str) or (isinstance(calibration, Sequence) and calibration and isinstance(calibration[0], str)):
        texts = [calibration] if isinstance(calibration, str) else list(calibration)
        if tokenizer is None:
            raise ValueError("tokenizer: text calibration needs a tokenizer (an object or a local path)")
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        batches = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts if t]
    else:
        batches = [torch.as_tensor(b) for b in calibration]
        batches = [b if b.dim() == 2 else b[None] for b in batches]
    batches = [b for b in batches if b.numel()]
    if not batches:
        raise ValueError("calibration: expected token ids or text, got no tokens")
    return batches


def _scored_modules(hf, arch: str) -> list:
    """Per layer, the modules whose inputs are the MLP hidden activation and the heads' outputs."""
    if arch == "gpt2":
        return [(b.mlp.c_proj, b.attn.c_proj) for b in hf.transformer.h]
    if arch == "bert":
        encoder = hf.encoder if hasattr(hf, "encoder") else hf.bert.encoder
        return [(b.output.dense, b.attention.output.dense) for b in encoder.layer]
    return [(b.mlp.down_proj, b.self_attn.o_proj) for b in hf.model.layers]


@torch.no_grad()
@torch.no_grad()  # forward passes only: no autograd graph of the source model's activations
def importance_scores(hf, config: FlextronConfig, batches: list) -> list:
    """Per layer ``(mlp_scores [F], head_scores [Hq])`` on the calibration batches."""
    layers = _scored_modules(hf, config.arch)
    scores = [[torch.zeros(config.ffn), torch.zeros(config.q_heads)] for _ in layers]
    hooks = []
    for i, (down, out_proj) in enumerate(layers):
        def mlp_hook(module, args, i=i):
            scores[i][0] += args[0].detach().float().abs().reshape(-1, config.ffn).sum(0).cpu()

        def head_hook(module, args, i=i):
            per_head = args[0].detach().float().reshape(-1, config.q_heads, config.head_dim)
            scores[i][1] += per_head.norm(dim=-1).sum(0).cpu()

        hooks += [down.register_forward_pre_hook(mlp_hook), out_proj.register_forward_pre_hook(head_hook)]
    try:
        device = next(hf.parameters()).device
        for ids in batches:
            hf(input_ids=ids.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return scores


def permutations_from_scores(scores: list, config: FlextronConfig) -> dict:
    """``{"mlp": [perm per layer], "heads": [query-head perm per layer]}`` (new -> old)."""
    mlp, heads = [], []
    group = config.group
    for mlp_scores, head_scores in scores:
        mlp.append(torch.argsort(mlp_scores, descending=True, stable=True).tolist())
        by_group = head_scores.reshape(config.kv_heads, group)
        kv_order = torch.argsort(by_group.sum(1), descending=True, stable=True)
        order = []
        for kv in kv_order.tolist():
            within = torch.argsort(by_group[kv], descending=True, stable=True)
            order += [kv * group + q for q in within.tolist()]
        heads.append(order)
    return {"mlp": mlp, "heads": heads}


@torch.no_grad()
def apply_permutations(model: FlextronForCausalLM, permutations: dict) -> None:
    """Reorder each layer's neurons and heads (new index ``j`` takes old ``perm[j]``)."""
    cfg = model.config
    dh, group = cfg.head_dim, cfg.group
    for layer, mlp_perm, head_perm in zip(model.layers, permutations["mlp"], permutations["heads"]):
        p = torch.tensor(mlp_perm, device=layer.mlp.w_up.device)
        mlp = layer.mlp
        for w in (mlp.w_up, mlp.w_gate, mlp.b_up):
            if w is not None:
                w.copy_(w[p])
        mlp.w_down.copy_(mlp.w_down[:, p])
        q_rows = torch.tensor([h * dh + d for h in head_perm for d in range(dh)], device=p.device)
        kv_perm = [head_perm[j * group] // group for j in range(cfg.kv_heads)]
        kv_rows = torch.tensor([h * dh + d for h in kv_perm for d in range(dh)], device=p.device)
        attn = layer.attn
        for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
            proj.weight.copy_(proj.weight[rows])
            if proj.bias is not None:
                proj.bias.copy_(proj.bias[rows])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, q_rows])


def from_hf(model_or_path, calibration=None, *, tokenizer=None, mlp_choices=None, head_choices=None, dtype=None,
            device=None) -> FlextronForCausalLM:
    """A :class:`FlextronForCausalLM` from a Hugging Face causal LM (object or local path).

    Args:
        calibration: token ids (``[B, S]`` tensor or a list of them) or text (with
            ``tokenizer``, an object or a local path); when given, neurons and heads are
            ranked by importance and permuted (see the module docstring). None keeps the
            original order.
        mlp_choices, head_choices: per-layer choice lists (default 25/50/75/100%).
        dtype, device: where the source model is loaded (a path: default fp32 on the CPU)
            or moved (an object, in place, as ``nn.Module.to`` moves it), and so where
            calibration runs and the model is built, e.g. ``dtype=torch.bfloat16,
            device="cuda"`` for a 7B checkpoint.
    """
    hf = load_hf_model(model_or_path, dtype=dtype, device=device)
    config = config_from_hf(hf.config)
    config.hf_model_type = hf.config.model_type
    return _convert(hf, config, FlextronForCausalLM, _copy_weights, calibration, tokenizer, mlp_choices, head_choices)


def _convert(hf, config, model_class, copy_weights, calibration, tokenizer, mlp_choices, head_choices, **model_kwargs):
    """Build ``model_class(config)`` like ``hf``, copy its weights, rank and permute."""
    if mlp_choices is not None:
        config.mlp_choices = mlp_choices
    if head_choices is not None:
        config.head_choices = head_choices
    config.__post_init__()
    batches = _calibration_ids(calibration, tokenizer)
    param = next(hf.parameters())
    model = model_class(config, **model_kwargs).to(device=param.device, dtype=param.dtype)
    copy_weights(model, hf)
    if batches:
        permutations = permutations_from_scores(importance_scores(hf, config, batches), config)
        apply_permutations(model, permutations)
        config.permutations = permutations
    return model.eval()


def encoder_config_from_hf(hf_config) -> FlextronConfig:
    if getattr(hf_config, "model_type", None) != "bert":
        raise ValueError(f"model_type: expected one of bert, got {getattr(hf_config, 'model_type', None)!r}")
    if hf_config.hidden_act != "gelu":
        raise ValueError(f"hidden_act: expected 'gelu' (erf), got {hf_config.hidden_act!r}")
    return FlextronConfig(
        arch="bert", vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
        q_heads=hf_config.num_attention_heads, kv_heads=hf_config.num_attention_heads, ffn=hf_config.intermediate_size,
        norm_eps=hf_config.layer_norm_eps, max_positions=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size, hf_model_type="bert",
    )


@torch.no_grad()
def _copy_encoder_weights(model, hf) -> None:
    emb = hf.embeddings
    model.embed.weight.copy_(emb.word_embeddings.weight)
    model.pos_embed.weight.copy_(emb.position_embeddings.weight)
    model.type_embed.weight.copy_(emb.token_type_embeddings.weight)
    model.embed_norm.load_state_dict(emb.LayerNorm.state_dict())
    for layer, block in zip(model.layers, hf.encoder.layer):
        attn = block.attention
        for ours, theirs in ((layer.attn.q_proj, attn.self.query), (layer.attn.k_proj, attn.self.key),
                             (layer.attn.v_proj, attn.self.value), (layer.attn.o_proj, attn.output.dense)):
            ours.load_state_dict(theirs.state_dict())
        layer.norm1.load_state_dict(attn.output.LayerNorm.state_dict())
        layer.mlp.w_up.copy_(block.intermediate.dense.weight)
        layer.mlp.b_up.copy_(block.intermediate.dense.bias)
        layer.mlp.w_down.copy_(block.output.dense.weight)
        layer.mlp.b_down.copy_(block.output.dense.bias)
        layer.norm2.load_state_dict(block.output.LayerNorm.state_dict())
    if model.pooler is not None:
        model.pooler.load_state_dict(hf.pooler.dense.state_dict())


def encoder_from_hf(model_or_path, calibration=None, *, tokenizer=None, mlp_choices=None, head_choices=None,
                    dtype=None, device=None):
    """A :class:`~flextron_kernels.models.encoder.FlextronEncoder` from a Hugging Face
    ``BertModel`` (object or local path); arguments as for :func:`from_hf`."""
    from flextron_kernels.models.encoder import FlextronEncoder

    hf = load_hf_model(model_or_path, "AutoModel", dtype=dtype, device=device)
    if hasattr(hf, "bert"):  # a task model (BertForMaskedLM, ...): its encoder
        hf = hf.bert
    config = encoder_config_from_hf(hf.config)
    return _convert(hf, config, FlextronEncoder, _copy_encoder_weights, calibration, tokenizer, mlp_choices,
                    head_choices, pooler=getattr(hf, "pooler", None) is not None)
