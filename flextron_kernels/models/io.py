"""Saving, loading and exporting Flextron models.

- ``save_pretrained(model, path)`` / ``from_pretrained(path)``: ``config.json`` (the
  FlextronConfig, with permutations and choice lists, and the routers' settings) and
  ``model.safetensors`` (weights and routers); a bit-exact round trip.
- ``export_hf(model, budget, path)``: a dense checkpoint at one budget that plain
  ``transformers`` loads, for uniform per-layer choices (the Llama family at any
  width and head count; GPT-2 at any MLP width with all heads, since GPT-2's config
  ties the head size to ``n_embd / n_head``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch

from flextron_kernels.models.config import FlextronConfig
from flextron_kernels.models.modeling import FlextronForCausalLM

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def save_pretrained(model: FlextronForCausalLM, path, *, state_dict=None) -> Path:
    """``state_dict``: the weights to write instead of ``model.state_dict()`` (e.g. full
    tensors gathered from a sharded model)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"flextron_config": model.config.to_dict(), "routers": model.router_settings, "budget": model.budget,
            "router_tau": model.router_tau}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # shares storage with embed.weight
    save_file(state, str(path / WEIGHTS_FILE))
    return path


def from_pretrained(path, *, device=None) -> FlextronForCausalLM:
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    model = FlextronForCausalLM(FlextronConfig.from_dict(meta["flextron_config"]))
    if meta["routers"]:
        model.attach_routers(**meta["routers"])
    state = load_file(str(path / WEIGHTS_FILE))
    dtype = next(iter(state.values())).dtype if state else None
    model.to(dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE}: missing {sorted(set(missing) - allowed_missing)}, unexpected {unexpected}")
    model.budget = meta["budget"]
    model.router_tau = meta["router_tau"]
    return model.to(device) if device is not None else model


def _copy_attention_prefix(dst, src, q_rows: int, kv_rows: int) -> None:
    """Copy the first ``q_rows`` rows of ``src``'s Q projection (``kv_rows`` of K and V) and
    the first ``q_rows`` columns of its O projection into ``dst`` (modules with
    ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ours or Hugging Face's)."""
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        s, d = getattr(src, name), getattr(dst, name)
        d.weight.copy_(s.weight[:rows])
        if s.bias is not None:
            d.bias.copy_(s.bias[:rows])
    dst.o_proj.weight.copy_(src.o_proj.weight[:, :q_rows])
    if src.o_proj.bias is not None:
        dst.o_proj.bias.copy_(src.o_proj.bias)
    for name in ("q_norm", "k_norm"):  # Qwen3's, over one head: shared by every head
        if getattr(src, name, None) is not None:
            getattr(dst, name).weight.copy_(getattr(src, name).weight)


def _window_settings(cfg, model_type: str, config_class) -> dict:
    """The Hugging Face config settings of ``cfg``'s sliding window for ``model_type``."""
    windowed = [i for i in range(cfg.n_layers) if cfg.layer_window(i) is not None]
    if model_type == "mistral":
        if windowed and len(windowed) != cfg.n_layers:
            raise ValueError(f"export_hf: a Mistral checkpoint windows every layer or none; this model windows layers "
                             f"{windowed}; use model_type='qwen2' or 'qwen3'")
        return dict(sliding_window=cfg.sliding_window if windowed else None)  # MistralConfig's default is a window
    if not windowed:
        return {}
    if model_type == "llama":
        raise ValueError(f"export_hf: a Llama checkpoint has no attention window (this model has one of "
                         f"{cfg.sliding_window} positions); use model_type='mistral', 'qwen2' or 'qwen3'")
    # Qwen2/3 window the layers from max_window_layers on; transformers 5 also takes the layers' types.
    settings = dict(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=windowed[0])
    if windowed != list(range(windowed[0], cfg.n_layers)):
        if "layer_types" not in inspect.signature(config_class.__init__).parameters:
            raise ValueError(f"export_hf: this transformers' {config_class.__name__} windows the last layers only; "
                             f"this model windows layers {windowed}")
        settings["layer_types"] = ["sliding_attention" if i in windowed else "full_attention" for i in range(cfg.n_layers)]
    return settings


def export_hf(model: FlextronForCausalLM, budget: float, path, *, model_type=None) -> Path:
    """Write a dense Hugging Face checkpoint of the sub-network at ``budget`` (see :func:`dense_hf_model`)."""
    path = Path(path)
    dense_hf_model(model, budget, model_type=model_type, loadable=True).save_pretrained(path, safe_serialization=True)
    return path


def _hf_attention_config(config_class, n_heads: int, n_kv: int, *, loadable: bool, **kwargs):
    """``config_class(num_attention_heads=n_heads, num_key_value_heads=n_kv, **kwargs)``.

    Recent transformers reject a hidden size that is not a multiple of the head count,
    though ``head_dim`` is given, and a sub-network's head count (24 of 32, say) need not
    divide it. In memory (``loadable=False``) such a config is built with one head and
    the counts are set after; a checkpoint (``loadable=True``) that transformers would
    refuse to load is a ValueError instead.
    """
    try:
        return config_class(num_attention_heads=n_heads, num_key_value_heads=n_kv, **kwargs)
    except Exception as error:  # a ValueError, or huggingface_hub's StrictDataclassError
        if n_heads == 0 or kwargs["hidden_size"] % n_heads == 0:
            raise
        if loadable:
            raise ValueError(
                f"export_hf: this sub-network has {n_heads} heads, which do not divide the hidden size "
                f"{kwargs['hidden_size']}, and this version of transformers refuses such a config ({error}); "
                "export_sliced writes the sub-network in this project's format"
            ) from error
    config = config_class(num_attention_heads=1, num_key_value_heads=1, **kwargs)
    config.num_attention_heads, config.num_key_value_heads = n_heads, n_kv
    return config


def _uninitialised(build, hf_config, device):
    """``build(hf_config)`` on ``device`` without the random initialisation of its weights
    (every weight is overwritten from the Flextron model; on a CPU, initialising a 7B-shaped
    model took longer than running it), then with its embeddings tied as the config says."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with torch.device(device), no_init_weights():
        hf = build(hf_config)
    hf.tie_weights()
    return hf


@torch.no_grad()
def dense_hf_model(model: FlextronForCausalLM, budget: float, *, model_type=None, loadable: bool = False):
    """The sub-network at ``budget`` as a dense Hugging Face model (in memory).

    ``model_type``: for a Llama-family model, ``llama``, ``mistral``, ``qwen2`` or ``qwen3`` (the
    checkpoint class; default: the converted checkpoint's, else ``llama``). Raises ValueError for heterogeneous per-layer choices or
    per-token routers, which plain ``transformers`` cannot express. ``loadable``: also a
    ValueError for a config that this version of transformers would refuse to load (a
    head count that does not divide the hidden size).
    """
    import transformers

    cfg = model.config
    if model.token_routers is not None:
        raise ValueError("export_hf: per-token routers cannot be exported to a dense checkpoint")
    was_training = model.training
    model.eval()
    plan = model._plan(budget, 1, model.embed.weight.device)
    model.train(was_training)
    widths = {p["width"] for p in plan}
    heads = {p["heads"] for p in plan}
    if len(widths) != 1 or len(heads) != 1:
        raise ValueError(f"export_hf: the budget's per-layer choices differ (widths {sorted(widths)}, heads {sorted(heads)}); "
                         "a dense Hugging Face checkpoint needs one width and one head count for every layer "
                         "(export_sliced writes such a sub-network in this project's format)")
    width, n_heads = widths.pop(), heads.pop()
    n_kv = n_heads // cfg.group
    dh = cfg.head_dim
    q_rows, kv_rows = n_heads * dh, n_kv * dh
    if cfg.arch == "gpt2":
        if n_heads != cfg.q_heads:
            raise ValueError(f"export_hf: a GPT-2 checkpoint cannot hold {n_heads} of {cfg.q_heads} heads "
                             "(its head size is n_embd / n_head); choose a budget that keeps all heads")
        hf_config = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.q_heads, n_inner=width,
            n_positions=cfg.max_positions, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
            tie_word_embeddings=cfg.tie_embeddings,
        )
        hf = _uninitialised(transformers.GPT2LMHeadModel, hf_config, model.embed.weight.device)
        base = hf.transformer
        base.wte.weight.copy_(model.embed.weight)
        base.wpe.weight.copy_(model.pos_embed.weight)
        for layer, block in zip(model.layers, base.h):
            block.ln_1.load_state_dict(layer.norm1.state_dict())
            block.ln_2.load_state_dict(layer.norm2.state_dict())
            a = layer.attn
            block.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).T)
            block.attn.c_attn.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            block.attn.c_proj.weight.copy_(a.o_proj.weight.T)
            block.attn.c_proj.bias.copy_(a.o_proj.bias)
            block.mlp.c_fc.weight.copy_(layer.mlp.w_up[:width].T)
            block.mlp.c_fc.bias.copy_(layer.mlp.b_up[:width])
            block.mlp.c_proj.weight.copy_(layer.mlp.w_down[:, :width].T)
            block.mlp.c_proj.bias.copy_(layer.mlp.b_down)
        base.ln_f.load_state_dict(model.final_norm.state_dict())
        if not cfg.tie_embeddings:
            hf.lm_head.weight.copy_(model.lm_head.weight)
    else:
        model_type = model_type or cfg.hf_model_type or "llama"
        config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                        "qwen2": transformers.Qwen2Config,
                        "qwen3": getattr(transformers, "Qwen3Config", None)}.get(model_type)
        if config_class is None:
            raise ValueError(f"model_type: expected one of llama, mistral, qwen2, qwen3 (with a transformers that has "
                             f"it), got {model_type!r}")
        if (model_type == "qwen3") != cfg.qk_norm:
            raise ValueError(f"export_hf: model_type {model_type!r} does not match this model's query and key norms "
                             f"(qk_norm={cfg.qk_norm}: only a qwen3 checkpoint has them)")
        extra = {}
        if model_type in ("llama", "qwen3"):
            extra["attention_bias"] = cfg.qkv_bias
            if cfg.qkv_bias != cfg.out_bias:
                raise ValueError("export_hf: a Llama checkpoint has Q/K/V and O biases together; use model_type='qwen2'")
        elif cfg.out_bias or (model_type == "qwen2") != cfg.qkv_bias:
            raise ValueError(f"export_hf: model_type {model_type!r} does not match this model's attention biases")
        if cfg.rope_scaling is not None:
            extra["rope_scaling"] = dict(cfg.rope_scaling)
        extra.update(_window_settings(cfg, model_type, config_class))
        hf_config = _hf_attention_config(
            config_class, n_heads, n_kv, loadable=loadable,
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=width, num_hidden_layers=cfg.n_layers,
            head_dim=dh, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta, **extra,
        )
        hf = _uninitialised(transformers.AutoModelForCausalLM.from_config, hf_config, model.embed.weight.device)
        base = hf.model
        base.embed_tokens.weight.copy_(model.embed.weight)
        for layer, block in zip(model.layers, base.layers):
            block.input_layernorm.weight.copy_(layer.norm1.weight)
            block.post_attention_layernorm.weight.copy_(layer.norm2.weight)
            _copy_attention_prefix(block.self_attn, layer.attn, q_rows, kv_rows)
            block.mlp.gate_proj.weight.copy_(layer.mlp.w_gate[:width])
            block.mlp.up_proj.weight.copy_(layer.mlp.w_up[:width])
            block.mlp.down_proj.weight.copy_(layer.mlp.w_down[:, :width])
        base.norm.weight.copy_(model.final_norm.weight)
        if not cfg.tie_embeddings:
            hf.lm_head.weight.copy_(model.lm_head.weight)
    param = model.embed.weight
    return hf.to(device=param.device, dtype=param.dtype).eval()


@torch.no_grad()
def export_sliced(model: FlextronForCausalLM, budget: float, path) -> Path:
    """Write the sub-network at ``budget`` as a smaller Flextron model (this project's
    format, read by ``FlextronForCausalLM.from_pretrained``): each layer holds only its
    chosen width and heads, so heterogeneous per-layer choices are kept. Its choice lists
    are the original ones up to each layer's size; routers are not carried over."""
    import copy

    was_training = model.training
    model.eval()
    plan = model._plan(budget, 1, model.embed.weight.device)
    model.train(was_training)
    cfg = copy.deepcopy(model.config)
    sizes = [[p["width"], p["heads"]] for p in plan]
    cfg.layer_sizes = sizes
    cfg.mlp_choices = [[c for c in choices if c < w] + [w] for choices, (w, _) in zip(cfg.mlp_choices, sizes)]
    cfg.head_choices = [[c for c in choices if c < h] + [h] for choices, (_, h) in zip(cfg.head_choices, sizes)]
    cfg.__post_init__()
    sliced = FlextronForCausalLM(cfg).to(device=model.embed.weight.device, dtype=model.embed.weight.dtype)
    sliced.embed.load_state_dict(model.embed.state_dict())
    if model.pos_embed is not None:
        sliced.pos_embed.load_state_dict(model.pos_embed.state_dict())
    sliced.final_norm.load_state_dict(model.final_norm.state_dict())
    if not cfg.tie_embeddings:
        sliced.lm_head.load_state_dict(model.lm_head.state_dict())
    for ours, theirs, (width, heads) in zip(sliced.layers, model.layers, sizes):
        rows, kv_rows = heads * cfg.head_dim, heads // cfg.group * cfg.head_dim
        ours.norm1.load_state_dict(theirs.norm1.state_dict())
        ours.norm2.load_state_dict(theirs.norm2.state_dict())
        _copy_attention_prefix(ours.attn, theirs.attn, rows, kv_rows)
        for name in ("w_up", "w_gate", "b_up"):
            src = getattr(theirs.mlp, name)
            if src is not None:
                getattr(ours.mlp, name).copy_(src[:width])
        ours.mlp.w_down.copy_(theirs.mlp.w_down[:, :width])
        if theirs.mlp.b_down is not None:
            ours.mlp.b_down.copy_(theirs.mlp.b_down)
    return save_pretrained(sliced, path)
