"""The model layer: conversion from Hugging Face, budgets, mixed-budget batches, generation."""

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels.models import FlextronConfig, FlextronForCausalLM
from flextron_kernels.models.io import dense_hf_model

transformers = pytest.importorskip("transformers", reason="the model-layer tests build Hugging Face models")

VOCAB = 101


def hf_model(kind: str):
    """A small random-initialised Hugging Face model of one family (nothing downloaded)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    elif kind == "llama_tied_bias":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(num_key_value_heads=4, attention_bias=True, tie_word_embeddings=True, **common)
        )
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, **common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    else:
        raise AssertionError(kind)
    with torch.no_grad():  # random biases and norms, so that their conversion is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


FAMILIES = ["llama", "llama_tied_bias", "mistral", "qwen2", "gpt2"]


def max_rel(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("calibrate", [False, True])
def test_conversion_reproduces_hf_logits_at_full_budget(kind, calibrate):
    hf = hf_model(kind)
    calibration = torch.randint(0, VOCAB, (3, 17)) if calibrate else None
    model = FlextronForCausalLM.from_hf(hf, calibration=calibration)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert max_rel(model(ids), hf(input_ids=ids).logits) < 1e-4
        assert max_rel(model(ids, budget=1.0), hf(input_ids=ids).logits) < 1e-4
    if calibrate:
        assert model.config.permutations["mlp"][0] != list(range(256)), "calibration should reorder neurons"


def test_importance_puts_the_strongest_neurons_and_heads_first():
    hf = hf_model("llama")
    calibration = torch.randint(0, VOCAB, (4, 16))
    model = FlextronForCausalLM.from_hf(hf, calibration=calibration)
    from flextron_kernels.models.convert import importance_scores

    mlp_scores, head_scores = importance_scores(hf, model.config, [calibration])[0]
    perm = model.config.permutations["mlp"][0]
    assert torch.all(mlp_scores[perm][:-1] >= mlp_scores[perm][1:])
    heads = model.config.permutations["heads"][0]
    group_scores = head_scores.reshape(2, 2).sum(1)
    assert group_scores[heads[0] // 2] >= group_scores[heads[2] // 2]


def test_local_safetensors_checkpoint_and_text_calibration(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "model", safe_serialization=True)
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path / "tok")
    texts = ["w1 w5 w7 w9 w33", "w2 w4 w8 w16 w32 w64"]
    model = FlextronForCausalLM.from_hf(tmp_path / "model", calibration=texts, tokenizer=tmp_path / "tok")
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert max_rel(model(ids), expected) < 1e-4
        # Loaded (and calibrated) in another dtype: the model is built in it.
        wide = FlextronForCausalLM.from_hf(tmp_path / "model", calibration=texts, tokenizer=tmp_path / "tok",
                                           dtype=torch.float64, device="cpu")
        assert {p.dtype for p in wide.parameters()} == {torch.float64}
        assert wide.config.permutations == model.config.permutations
        assert max_rel(wide(ids).float(), expected) < 1e-4
        half = FlextronForCausalLM.from_hf(hf_model("llama"), dtype=torch.bfloat16)  # an object: moved
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        assert max_rel(half(ids).float(), expected) < 5e-2


def test_smaller_budgets_use_fewer_flops_and_change_the_output():
    model = FlextronForCausalLM.from_hf(hf_model("llama"), mlp_choices=[[64, 128, 192, 256]] * 2)
    costs = [model.cost(b)["flops_per_token"] for b in (0.25, 0.5, 0.75, 1.0)]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(model(ids, budget=0.25), model(ids, budget=1.0))
    assert model.layer_choices(0.5) == [(128, 2), (128, 2)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_budget_batch_equals_each_request_alone(kind):
    model = FlextronForCausalLM.from_hf(hf_model(kind), mlp_choices=[[64, 128, 192, 256]] * 2)
    ids = torch.randint(0, VOCAB, (3, 10))
    budgets = torch.tensor([1.0, 0.5, 0.25])
    with torch.no_grad():
        mixed = model(ids, budget=budgets)
        for i, b in enumerate(budgets.tolist()):
            torch.testing.assert_close(mixed[i], model(ids[i : i + 1], budget=b)[0], rtol=1e-5, atol=1e-5)


def test_packed_variable_length_sequences():
    model = FlextronForCausalLM.from_hf(hf_model("llama"))
    a, b = torch.randint(0, VOCAB, (5,)), torch.randint(0, VOCAB, (9,))
    with torch.no_grad():
        packed = model(torch.cat([a, b]), cu_seqlens=torch.tensor([0, 5, 14]))
        torch.testing.assert_close(packed[:5], model(a[None])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[5:], model(b[None])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("budget", [1.0, 0.5, "mixed"])
def test_generation_with_cache_equals_generation_without(kind, budget):
    model = FlextronForCausalLM.from_hf(hf_model(kind), mlp_choices=[[64, 128, 192, 256]] * 2)
    prompts = torch.randint(0, VOCAB, (2, 6))
    budget = torch.tensor([1.0, 0.5]) if budget == "mixed" else budget
    out = model.generate(prompts, budget=budget, max_new_tokens=5)
    assert out.shape == (2, 11)
    ids = prompts
    with torch.no_grad():
        for _ in range(5):
            nxt = model(ids, budget=budget)[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert torch.equal(out, ids)


def record_value_checks(monkeypatch, module_name: str) -> list:
    """Whether each value check (a host sync on a GPU) that ``module_name`` makes runs, in order."""
    import importlib

    module = importlib.import_module(module_name)
    seen = []
    check = module.value_checks_enabled
    monkeypatch.setattr(module, "value_checks_enabled", lambda t: seen.append(check(t)) or seen[-1])
    return seen


def test_generation_decode_steps_do_not_sync_on_value_checks(monkeypatch):
    # The decode steps' inputs are built by generate itself: their value checks (a host
    # sync per layer on a GPU) are skipped; the prefill's are not.
    seen = record_value_checks(monkeypatch, "flextron_kernels.ops.elastic_attention_decode")
    model = FlextronForCausalLM.from_hf(hf_model("llama"), mlp_choices=[[64, 128, 192, 256]] * 2)
    model.generate(torch.randint(0, VOCAB, (2, 4)), budget=0.5, max_new_tokens=3)
    assert seen and not any(seen)
    with pytest.raises(ValueError, match="budget"):
        model.generate(torch.randint(0, VOCAB, (2, 4)), budget=torch.tensor([0.5, 1.5]), max_new_tokens=3)


def test_prefill_checks_packing_and_caches_once_not_per_layer(monkeypatch):
    seen = record_value_checks(monkeypatch, "flextron_kernels.ops.elastic_attention")
    model = FlextronForCausalLM.from_hf(hf_model("llama"), mlp_choices=[[64, 128, 192, 256]] * 2)
    ids = torch.randint(0, VOCAB, (9,))
    cu = torch.tensor([0, 4, 9])
    with torch.no_grad():
        model(ids, cu_seqlens=cu, budget=torch.tensor([0.5, 1.0]), caches=model.new_caches(2, 6))
    # Checked by the model; each layer's attention (a host sync per check on a GPU) skips it.
    assert seen and not any(seen)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing offsets from 0 to T=9, got \[0, 6, 4, 9\]"):
            model(ids, cu_seqlens=torch.tensor([0, 6, 4, 9]))
        with pytest.raises(TypeError, match="cu_seqlens: expected dtype in"):
            model(ids, cu_seqlens=cu.float())
        with pytest.raises(ValueError, match="cu_seqlens: expected at least 2 entries \\(B \\+ 1\\), got 1"):
            model(ids, cu_seqlens=cu[:1])
        with pytest.raises(ValueError, match="caches: a sequence of 5 tokens does not fit caches of 4 positions"):
            model(ids, cu_seqlens=cu, caches=model.new_caches(2, 4))
        with pytest.raises(ValueError, match=r"caches: expected one cache per layer \(2\) with one request per sequence \(2\)"):
            model(ids, cu_seqlens=cu, caches=model.new_caches(3, 8))
        # [B, S] prompts: the longest is known without reading values (checked even when skipped).
        with fk.skip_width_value_checks(), pytest.raises(ValueError, match="a sequence of 5 tokens does not fit caches of 3"):
            model(ids[:5].reshape(1, 5), caches=model.new_caches(1, 3))


def test_generation_sampling_and_eos():
    model = FlextronForCausalLM.from_hf(hf_model("llama"))
    prompts = torch.randint(0, VOCAB, (2, 4))
    gen = torch.Generator().manual_seed(0)
    out = model.generate(prompts, max_new_tokens=6, temperature=0.8, top_k=10, top_p=0.9, generator=gen)
    assert out.shape == (2, 10) and (out[:, :4] == prompts).all()
    greedy = model.generate(prompts, max_new_tokens=6)
    eos = int(greedy[0, 5])
    stopped = model.generate(prompts, max_new_tokens=6, eos_token_id=eos)
    assert (stopped[0, 5:] == eos).all()


def test_model_through_the_triton_backend_matches_torch():
    model = FlextronForCausalLM.from_hf(hf_model("llama"), mlp_choices=[[64, 128, 192, 256]] * 2)
    ids = torch.randint(0, VOCAB, (2, 7))
    budgets = torch.tensor([0.75, 0.25])
    with torch.no_grad():
        with fk.use_backend("torch"):
            expected = model(ids, budget=budgets)
        with fk.use_backend("triton"):
            got = model(ids, budget=budgets)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="model_type: expected one of gpt2, llama, mistral, qwen2, qwen3, got 'bert'"):
        FlextronForCausalLM.from_hf(transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))
    hf = hf_model("llama")
    with pytest.raises(ValueError, match="calibration: expected token ids or text, got no tokens"):
        FlextronForCausalLM.from_hf(hf, calibration=[])
    with pytest.raises(ValueError, match="calibration: expected token ids or text, got no tokens"):
        FlextronForCausalLM.from_hf(hf, calibration=torch.zeros(1, 0, dtype=torch.int64))
    model = FlextronForCausalLM.from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 3))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="budget: expected a float in \\(0, 1\\]"):
            model(ids, budget=bad)
    with pytest.raises(ValueError, match="budget: expected values in \\(0, 1\\]"):
        model(ids, budget=torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="budget: expected one value per sequence \\(2\\)"):
        model(ids, budget=torch.tensor([0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="budget: expected a float in \\(0, 1\\]"):
        model.set_budget(2)
    with pytest.raises(ValueError, match="arch: expected one of llama, gpt2, bert, got 't5'"):
        FlextronConfig(arch="t5", vocab_size=10, d_model=8, n_layers=1, q_heads=2, kv_heads=2, ffn=16)
    with pytest.raises(ValueError, match="config.arch: expected 'llama' or 'gpt2' for a causal LM, got 'bert'"):
        FlextronForCausalLM(FlextronConfig(arch="bert", vocab_size=10, d_model=8, n_layers=1, q_heads=2, kv_heads=2, ffn=16))
    with pytest.raises(ValueError, match="head_choices\\[0\\]: expected multiples of the GQA group 2"):
        FlextronConfig(arch="llama", vocab_size=10, d_model=8, n_layers=1, q_heads=4, kv_heads=2, ffn=16, head_choices=[[1, 4]])


@pytest.mark.parametrize("routers", [False, True])
def test_save_and_load_round_trip_is_bit_exact(tmp_path, routers):
    pytest.importorskip("safetensors")
    model = FlextronForCausalLM.from_hf(hf_model("llama_tied_bias"), calibration=torch.randint(0, VOCAB, (2, 9)))
    if routers:
        model.attach_routers(hidden=16, static=True, token=True)
    model.set_budget(0.5)
    model.save_pretrained(tmp_path / "flex")
    loaded = FlextronForCausalLM.from_pretrained(tmp_path / "flex")
    assert loaded.config == model.config and loaded.budget == 0.5
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), loaded.eval()(ids))


@pytest.mark.parametrize("kind,budget", [("llama", 0.5), ("qwen2", 0.5), ("mistral", 1.0), ("gpt2", 0.5)])
def test_export_hf_round_trip(tmp_path, kind, budget):
    model = FlextronForCausalLM.from_hf(hf_model(kind), calibration=torch.randint(0, VOCAB, (2, 9)),
                                        mlp_choices=[[64, 128, 192, 256]] * 2,
                                        head_choices=[[4]] * 2 if kind == "gpt2" else None)
    model.export_hf(budget, tmp_path / "dense")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True).eval()
    expected_ffn = 128
    assert (dense.config.n_inner if kind == "gpt2" else dense.config.intermediate_size) == (expected_ffn if budget < 1 else 256)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert max_rel(dense(input_ids=ids).logits, model(ids, budget=budget)) < 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_dense_gpt2_keeps_an_untied_output_head(tied):
    config = FlextronConfig(arch="gpt2", vocab_size=VOCAB, d_model=64, n_layers=2, q_heads=4, kv_heads=4, ffn=256,
                            max_positions=64, tie_embeddings=tied, mlp_choices=[[128, 256]] * 2, head_choices=[[4]] * 2)
    torch.manual_seed(0)
    model = FlextronForCausalLM(config).eval()
    dense = dense_hf_model(model, 0.5)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert max_rel(dense(input_ids=ids).logits, model(ids, budget=0.5)) < 1e-4


def test_head_count_that_does_not_divide_the_hidden_size(tmp_path):
    model = FlextronForCausalLM.from_hf(hf_model("llama_tied_bias"), calibration=torch.randint(0, VOCAB, (2, 9)),
                                        mlp_choices=[[128, 256]] * 2, head_choices=[[3, 4]] * 2)
    dense = dense_hf_model(model, 0.5)  # in memory, whatever transformers' checks
    assert dense.config.num_attention_heads == 3 and dense.config.hidden_size == 64
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert max_rel(dense(input_ids=ids).logits, model(ids, budget=0.5)) < 1e-4
    try:
        transformers.LlamaConfig(hidden_size=64, num_attention_heads=3, num_key_value_heads=3, head_dim=16)
    except Exception:  # this transformers refuses the config: export says so
        with pytest.raises(ValueError, match="export_hf: this sub-network has 3 heads, which do not divide the hidden size 64"):
            model.export_hf(0.5, tmp_path / "dense")
        return
    model.export_hf(0.5, tmp_path / "dense")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True).eval()
    with torch.no_grad():
        assert max_rel(loaded(input_ids=ids).logits, model(ids, budget=0.5)) < 1e-4


def test_export_errors(tmp_path):
    model = FlextronForCausalLM.from_hf(hf_model("gpt2"))
    with pytest.raises(ValueError, match="a GPT-2 checkpoint cannot hold 1 of 4 heads"):
        model.export_hf(0.25, tmp_path / "x")
    llama = FlextronForCausalLM.from_hf(hf_model("llama"), mlp_choices=[[64, 256], [128, 256]])
    with pytest.raises(ValueError, match="per-layer choices differ"):
        llama.export_hf(0.5, tmp_path / "y")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_sliced_keeps_heterogeneous_choices(tmp_path, kind):
    model = FlextronForCausalLM.from_hf(hf_model(kind), calibration=torch.randint(0, VOCAB, (2, 9)),
                                        mlp_choices=[[64, 256], [128, 256]])
    model.attach_routers(hidden=8)
    with torch.no_grad():  # router: layer 0 at width 64 and the fewest heads, layer 1 in full
        mlp_bias = model.static_router.mlp[-1].bias
        heads_bias = model.static_router.heads[-1].bias
        model.static_router.mlp[-1].weight.zero_()
        model.static_router.heads[-1].weight.zero_()
        mlp_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 10.0]))
        heads_bias.copy_(torch.tensor([10.0] + [0.0] * (heads_bias.numel() - 1)))
    model.export_sliced(0.5, tmp_path / "sliced")
    sliced = FlextronForCausalLM.from_pretrained(tmp_path / "sliced")
    assert [l.mlp.ffn for l in sliced.layers] == [64, 256]
    assert sliced.config.layer_sizes[0][1] == model.config.head_choices[0][0]
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(sliced(ids, budget=1.0), model.eval()(ids, budget=0.5), rtol=1e-5, atol=1e-5)
        sliced.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="export_sliced writes such a sub-network"):
        model.export_hf(0.5, tmp_path / "dense")


# Scalings that change positions within the tests' 48-token sequences: small original
# context lengths.
HF_ROPE_SCALINGS = {
    "linear": ("llama", {"rope_type": "linear", "factor": 3.0}),
    "llama3": ("llama", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
    "yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    # A factor that is not a power of two: its frequencies round as transformers' only when
    # computed in the same order.
    "yarn3": ("qwen2", {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16}),
}


def hf_scaled_model(kind, scaling, **extra):
    torch.manual_seed(0)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rope_theta=1000.0, rope_scaling=dict(scaling) if scaling else None, **extra)
    return model_class(config).eval()


@pytest.mark.parametrize("name", sorted(HF_ROPE_SCALINGS))
def test_conversion_keeps_the_checkpoints_rope_scaling(tmp_path, name):
    kind, scaling = HF_ROPE_SCALINGS[name]
    hf = hf_scaled_model(kind, scaling)
    model = FlextronForCausalLM.from_hf(hf, calibration=torch.randint(0, VOCAB, (2, 9)))
    assert model.config.rope_scaling == scaling and model.config.rope_theta == 1000.0
    ids = torch.randint(0, VOCAB, (2, 48))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert max_rel(model(ids), expected) < 1e-4
        plain = FlextronForCausalLM.from_hf(hf, calibration=torch.randint(0, VOCAB, (2, 9)))
        for layer in plain.layers:
            layer.attn.rope_scaling = None
        assert max_rel(plain(ids), expected) > 1e-3, "without its scaling the model should differ"
        # Generation (prefill, then decode steps against the cache) rotates as the prefill does.
        prompt = ids[:, :20]
        generated = model.generate(prompt, max_new_tokens=6)
        assert torch.equal(generated, hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))
    model.export_hf(1.0, tmp_path / "dense")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True).eval()
    with torch.no_grad():
        assert max_rel(dense(input_ids=ids).logits, expected) < 1e-4
    model.save_pretrained(tmp_path / "saved")
    model.export_sliced(0.5, tmp_path / "sliced")
    for path, budget in ((tmp_path / "saved", 0.5), (tmp_path / "sliced", 1.0)):
        loaded = FlextronForCausalLM.from_pretrained(path)
        assert loaded.config.rope_scaling == scaling
        with torch.no_grad():
            assert max_rel(loaded.eval()(ids, budget=budget), model.eval()(ids, budget=0.5)) < 1e-5


@pytest.mark.parametrize("scaling,message", [
    ({"rope_type": "dynamic", "factor": 2.0},
     r"the checkpoint's rope_parameters \(rope_scaling before transformers 5\): expected rope_type among linear, "
     "llama3, yarn .*got 'dynamic'"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor: expected 1.0 .*got 0.5"),
])
def test_conversion_refuses_rope_it_does_not_compute(scaling, message):
    hf = hf_scaled_model("llama", scaling)
    with pytest.raises(ValueError, match=message):
        FlextronForCausalLM.from_hf(hf)


@pytest.mark.parametrize("kind,extra,layers", [
    ("mistral", dict(sliding_window=8), None),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), [1]),
])
def test_a_windowed_checkpoint_matches_transformers_past_its_window(kind, extra, layers):
    from flextron_kernels.serving import Request, Server

    hf = hf_scaled_model(kind, None, **extra)
    model = FlextronForCausalLM.from_hf(hf, calibration=torch.randint(0, VOCAB, (2, 9)))
    assert (model.config.sliding_window, model.config.window_layers) == (8, layers)
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert max_rel(model(ids), expected) < 1e-4
        # Past the window it matters: a test of it can fail.
        full = FlextronForCausalLM.from_hf(hf_scaled_model(kind, None))
        assert max_rel(full(ids), expected) > 1e-3
        # Decode steps past the window read its last positions only, as the prefill does.
        generated = model.generate(ids[:, :5], max_new_tokens=20)
        assert torch.equal(generated, hf.generate(ids[:, :5], max_new_tokens=20, do_sample=False, pad_token_id=0))
        if kind == "mistral":  # the kernels too (the Triton interpreter), past the window
            with fk.use_backend("triton"):
                assert max_rel(model(ids[:1, :20]), expected[:1, :20]) < 1e-4
        served = Server(model, max_batch=2, max_len=32, cuda_graphs=False).run(
            [Request(ids[i, :5].tolist(), max_new_tokens=20) for i in range(2)])
        assert [c.tokens for c in served] == generated[:, 5:].tolist()


@pytest.mark.parametrize("kind,extra,window,layers", [
    ("mistral", dict(sliding_window=None), None, None),
    ("mistral", dict(sliding_window=4096), 4096, None),
    ("qwen2", dict(), None, None),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1), 32, [1]),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=0), 32, None),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, layer_types=["sliding_attention", "full_attention"]),
     32, [0]),
    ("llama", dict(), None, None),
])
def test_converted_window_and_its_export(tmp_path, kind, extra, window, layers):
    model = FlextronForCausalLM.from_hf(hf_scaled_model(kind, None, **extra))
    assert (model.config.sliding_window, model.config.window_layers) == (window, layers)
    model.export_hf(1.0, tmp_path / "dense")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True).eval()
    again = FlextronForCausalLM.from_hf(dense).config
    assert (again.sliding_window, again.window_layers) == (window, layers)
    if window is not None and kind == "mistral":
        with pytest.raises(ValueError, match="export_hf: a Llama checkpoint has no attention window"):
            model.export_hf(1.0, tmp_path / "as_llama", model_type="llama")


def test_a_mistral_checkpoint_windows_every_layer_or_none(tmp_path):
    config = FlextronConfig(arch="llama", vocab_size=VOCAB, d_model=64, n_layers=2, q_heads=4, kv_heads=2, ffn=128,
                            sliding_window=8, window_layers=[1])
    model = FlextronForCausalLM(config)
    with pytest.raises(ValueError, match=r"export_hf: a Mistral checkpoint windows every layer or none; .*layers \[1\]"):
        model.export_hf(1.0, tmp_path / "as_mistral", model_type="mistral")


@pytest.mark.parametrize("values,message", [
    (dict(arch="gpt2", rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "rope_scaling: expected None for arch 'gpt2' .*got {'rope_type': 'linear', 'factor': 2.0}"),
    (dict(arch="llama", rope_scaling={"rope_type": "linear"}), r"rope_scaling: a 'linear' scaling takes factor; missing \['factor'\]"),
    (dict(arch="llama", sliding_window=0), "sliding_window: expected None or a positive int, got 0"),
    (dict(arch="llama", sliding_window=True), "sliding_window: expected None or a positive int, got True"),
    (dict(arch="llama", sliding_window=4, window_layers=[1]), r"window_layers: expected None or distinct ascending .*\[0, 1\)"),
    (dict(arch="llama", window_layers=[0]), "window_layers: expected None or .* with a sliding_window"),
])
def test_config_refuses_bad_rope_scaling_and_window(values, message):
    with pytest.raises(ValueError, match=message):
        FlextronConfig(vocab_size=VOCAB, d_model=64, n_layers=1, q_heads=4, kv_heads=4, ffn=128, **values)


def test_torch_compile_of_the_whole_model_forward_and_backward():
    config = FlextronConfig(arch="llama", vocab_size=VOCAB, d_model=64, n_layers=2, q_heads=4, kv_heads=2, ffn=128)
    torch.manual_seed(0)
    model = FlextronForCausalLM(config)
    ids = torch.randint(0, VOCAB, (2, 9))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a fixed budget: no graph break
    for budget in (0.5, 1.0):
        expected = model(ids, budget=budget)
        expected.float().square().mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        out = compiled(ids, budget=budget)
        out.float().square().mean().backward()
        torch.testing.assert_close(out, expected)
        assert grads and grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
        for name, p in model.named_parameters():
            if name in grads:
                torch.testing.assert_close(p.grad, grads[name], msg=name)
        model.zero_grad(set_to_none=True)
    # With routers (a static router's choice is read on the host: graph breaks, same result).
    model.attach_routers(static=True, token=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(ids, budget=0.5), model(ids, budget=0.5))


@pytest.mark.parametrize("kind,setting,message", [
    ("llama", dict(hidden_act="gelu"), "hidden_act: expected 'silu' or 'swish' .*got 'gelu'"),
    ("qwen2", dict(hidden_act="relu"), "hidden_act: expected 'silu' or 'swish' .*got 'relu'"),
    ("gpt2", dict(activation_function="relu"), "activation_function: expected 'gelu_new' or 'gelu_pytorch_tanh' .*got 'relu'"),
    ("gpt2", dict(scale_attn_weights=False), "scale_attn_weights: expected True .*got False"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx: expected False .*got True"),
])
def test_conversion_refuses_settings_the_model_would_not_honour(kind, setting, message):
    hf = hf_model(kind)
    for name, value in setting.items():
        setattr(hf.config, name, value)
    with pytest.raises(ValueError, match=message):
        FlextronForCausalLM.from_hf(hf)


def test_rope_and_window_of_configs_written_by_older_transformers():
    """Configs as transformers 4 kept them: ``rope_scaling`` with ``type`` or ``rope_type``,
    ``rope_theta`` an attribute, Qwen2's window without ``layer_types``."""
    from types import SimpleNamespace

    from flextron_kernels.models.convert import _rope_from_hf, _sliding_window

    old = SimpleNamespace(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=64)
    assert _rope_from_hf(old) == (500000.0, {"rope_type": "linear", "factor": 2.0})
    old = SimpleNamespace(rope_theta=1e6, rope_scaling={"rope_type": "yarn", "factor": None,
                                                        "original_max_position_embeddings": 16}, max_position_embeddings=64)
    assert _rope_from_hf(old) == (1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    old = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 2.0}, max_position_embeddings=64)
    assert _rope_from_hf(old) == (1e6, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64})
    assert _rope_from_hf(SimpleNamespace(rope_theta=10000.0, rope_scaling=None)) == (10000.0, None)
    qwen2 = dict(sliding_window=8, use_sliding_window=True, num_hidden_layers=2)
    assert _sliding_window(SimpleNamespace(max_window_layers=1, **qwen2)) == dict(sliding_window=8, window_layers=[1])
    assert _sliding_window(SimpleNamespace(max_window_layers=0, **qwen2)) == dict(sliding_window=8, window_layers=None)
    assert _sliding_window(SimpleNamespace(max_window_layers=2, **qwen2)) == {}
    assert _sliding_window(SimpleNamespace(**dict(qwen2, use_sliding_window=False), max_window_layers=0)) == {}
    mistral = SimpleNamespace(sliding_window=8, num_hidden_layers=3)  # every layer
    assert _sliding_window(mistral) == dict(sliding_window=8, window_layers=None)
    # A Mistral config with layer_types: transformers' Mistral windows every layer all the same.
    mistral = SimpleNamespace(model_type="mistral", sliding_window=8, num_hidden_layers=2,
                              layer_types=["sliding_attention", "full_attention"])
    assert _sliding_window(mistral) == dict(sliding_window=8, window_layers=None)


def _left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    return ids, mask


@pytest.mark.parametrize("budget", [1.0, 0.5, "per_request"])
def test_generate_with_a_left_padded_batch_as_transformers_does(budget):
    hf = hf_model("llama")
    model = FlextronForCausalLM.from_hf(hf, calibration=torch.randint(0, VOCAB, (2, 9))).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (5, 11, 1, 8)]
    ids, mask = _left_padded(prompts)
    budgets = torch.tensor([1.0, 0.5, 0.25, 0.75]) if budget == "per_request" else budget
    out = model.generate(ids, attention_mask=mask, budget=budgets, max_new_tokens=6)
    assert out.shape == (4, ids.shape[1] + 6) and torch.equal(out[:, : ids.shape[1]], ids)
    for i, prompt in enumerate(prompts):  # each row as if generated alone
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=6,
                               budget=budgets[i: i + 1] if budget == "per_request" else budget)
        assert torch.equal(out[i, ids.shape[1]:], alone[0, len(prompt):]), i
    if budget == 1.0:
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, expected)
    # All ones: the same as no mask.
    full = torch.randint(1, VOCAB, (2, 7))
    assert torch.equal(model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=3),
                       model.generate(full, max_new_tokens=3))


@pytest.mark.parametrize("mask,error,message", [
    (torch.ones(2, 5, dtype=torch.long), ValueError, r"attention_mask: expected the shape of input_ids \(2, 4\), got \(2, 5\)"),
    (torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), ValueError, r"attention_mask: expected at least one token .* rows \[1\]"),
    (torch.tensor([[1, 2, 1, 1], [1, 1, 1, 1]]), ValueError, "attention_mask: expected 0 .* and 1 .* only, got 1 other"),
    (torch.ones(4, dtype=torch.long), ValueError, "attention_mask"),
    (torch.ones(2, 4, dtype=torch.complex64), TypeError, "attention_mask: expected a bool, integer or float tensor"),
])
def test_generate_refuses_a_bad_attention_mask(mask, error, message):
    config = FlextronConfig(arch="llama", vocab_size=VOCAB, d_model=64, n_layers=1, q_heads=4, kv_heads=2, ffn=128)
    model = FlextronForCausalLM(config).eval()
    with pytest.raises(error, match=message):
        model.generate(torch.randint(0, VOCAB, (2, 4)), attention_mask=mask, max_new_tokens=2)


def test_forward_with_an_attention_mask_runs_each_row_alone():
    config = FlextronConfig(arch="llama", vocab_size=VOCAB, d_model=64, n_layers=2, q_heads=4, kv_heads=2, ffn=128)
    torch.manual_seed(0)
    model = FlextronForCausalLM(config).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    ids, mask = _left_padded(prompts)
    mask[0, -1] = 0  # a right pad too: row 0 is [pad x3, 5, 6, pad]
    budgets = torch.tensor([1.0, 0.5, 0.25])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, budget=budgets)
        assert logits.shape == (3, 6, VOCAB) and torch.all(logits[mask == 0] == 0)
        for i, row in enumerate(mask.bool()):
            alone = model(ids[i][row][None], budget=budgets[i: i + 1])[0]
            torch.testing.assert_close(logits[i][row], alone)
    empty = torch.zeros(0, 6, dtype=torch.long)  # an empty batch, with or without a mask
    assert model(empty).shape == model(empty, attention_mask=empty).shape == (0, 6, VOCAB)
    with pytest.raises(ValueError, match="attention_mask: expected with input_ids \\[B, S\\] and no cu_seqlens"):
        model(ids.reshape(-1), attention_mask=mask.reshape(-1), cu_seqlens=torch.tensor([0, 18], dtype=torch.int32))


def hf_qwen3(**extra):
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=64, **extra)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # norms (the query and key norms among them) away from ones
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("extra", [dict(), dict(attention_bias=True, tie_word_embeddings=True)])
def test_qwen3_conversion_generation_and_export(tmp_path, extra):
    hf = hf_qwen3(**extra)
    model = FlextronForCausalLM.from_hf(hf, calibration=torch.randint(0, VOCAB, (3, 11)))
    assert model.config.qk_norm and model.config.hf_model_type == "qwen3"
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert max_rel(model(ids), expected) < 1e-4
        without = FlextronForCausalLM.from_hf(hf)
        for layer in without.layers:
            layer.attn.q_norm.weight.fill_(1.0)
        assert max_rel(without(ids), expected) > 1e-3, "the query and key norms should matter"
        assert torch.equal(model.generate(ids[:, :6], max_new_tokens=5),
                           hf.generate(ids[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0))
        half = model(ids, budget=0.5)
    model.export_hf(0.5, tmp_path / "dense")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True).eval()
    assert dense.config.model_type == "qwen3"
    with torch.no_grad():
        assert max_rel(dense(input_ids=ids).logits, half) < 1e-4
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(FlextronForCausalLM.from_pretrained(tmp_path / "saved").eval()(ids), model.eval()(ids))
    with pytest.raises(ValueError, match="export_hf: model_type 'llama' does not match this model's query and key norms"):
        model.export_hf(1.0, tmp_path / "as_llama", model_type="llama")


def test_qk_norm_only_for_llama_models():
    with pytest.raises(ValueError, match="qk_norm: expected False for arch 'gpt2'"):
        FlextronConfig(arch="gpt2", vocab_size=VOCAB, d_model=64, n_layers=1, q_heads=4, kv_heads=4, ffn=128, qk_norm=True)


@pytest.mark.parametrize("kind", ["llama", "mistral_window", "qwen3", "gpt2", "routers"])
@pytest.mark.parametrize("budget", [1.0, 0.5, "mixed"])
def test_extend_continues_caches_as_one_prefill(kind, budget):
    """A prompt in chunks (a prefill, then extensions; packed and [B, S], a request with no
    new token in one) gives the logits of one prefill over the whole prompt, and the caches
    then hold what that prefill fills."""
    if kind == "mistral_window":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, sliding_window=5)).eval()
    elif kind == "qwen3":
        hf = hf_qwen3()
    else:
        hf = hf_model("gpt2" if kind == "gpt2" else "llama")
    model = FlextronForCausalLM.from_hf(hf, mlp_choices=[[64, 128, 192, 256]] * 2)
    if kind == "routers":
        torch.manual_seed(3)
        model.attach_routers(hidden=16, static=True, token=True)
    model.eval()
    budget = torch.tensor([1.0, 0.5, 0.25]) if budget == "mixed" else budget
    ids = torch.randint(0, VOCAB, (3, 13))
    with torch.no_grad():
        whole_caches = model.new_caches(3, 16)
        whole = model(ids, budget=budget, caches=whole_caches)
        caches = model.new_caches(3, 16)
        first = model(ids[:, :6], budget=budget, caches=caches)
        middle = model.extend(ids[:, 6:9], caches, budget=budget)
        # Packed: request 1 has no new token this time, then catches up.
        packed = model.extend(torch.cat([ids[0, 9:], ids[2, 9:]]), caches, budget=budget,
                              cu_seqlens=torch.tensor([0, 4, 4, 8]))
        last = model.extend(ids[1, 9:], caches, budget=budget, cu_seqlens=torch.tensor([0, 0, 4, 4]))
    got = torch.cat([first, middle], 1)
    torch.testing.assert_close(got, whole[:, :9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed, torch.cat([whole[0, 9:], whole[2, 9:]]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, whole[1, 9:], rtol=1e-4, atol=1e-4)
    for c, w in zip(caches, whole_caches):
        assert c.seqlens.tolist() == [13, 13, 13]
        torch.testing.assert_close(c.k[:, :, :13], w.k[:, :, :13], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_generate_continues_a_conversation_in_its_caches(budget):
    """Turn by turn in the same caches, as one generate over the whole conversation."""
    model = FlextronForCausalLM.from_hf(hf_model("llama"), mlp_choices=[[64, 128, 192, 256]] * 2)
    turn1, turn2 = torch.randint(0, VOCAB, (2, 7)), torch.randint(0, VOCAB, (2, 4))
    caches = model.new_caches(2, 40)
    out1 = model.generate(turn1, budget=budget, max_new_tokens=5, caches=caches)
    assert caches[0].seqlens.tolist() == [12, 12]  # every returned token, the last included
    out2 = model.generate(turn2, budget=budget, max_new_tokens=6, caches=caches)
    conversation = torch.cat([out1, turn2], 1)
    whole = model.generate(conversation, budget=budget, max_new_tokens=6)
    assert torch.equal(out2, whole[:, out1.shape[1]:])
    assert caches[0].seqlens.tolist() == [22, 22]
    with pytest.raises(ValueError, match="caches: 40 positions, too few for the 22 a request holds"):
        model.generate(turn2, budget=budget, max_new_tokens=20, caches=caches)


def test_extend_refuses_what_it_cannot_continue_and_leaves_the_caches_as_they_were():
    config = FlextronConfig(arch="llama", vocab_size=VOCAB, d_model=64, n_layers=2, q_heads=4, kv_heads=2, ffn=128)
    model = FlextronForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    caches = model.new_caches(2, 8)
    cases = [
        (dict(input_ids=ids, caches=caches[:1]),
         "caches: expected one cache per layer \\(2\\) with one request per sequence \\(2\\)"),
        (dict(input_ids=ids, caches=caches), "caches: a request would hold 10 positions after this extension, past the caches' 8"),
        (dict(input_ids=ids[0, :4], caches=caches, cu_seqlens=torch.tensor([0, 3, 2])),
         "cu_seqlens: expected non-decreasing offsets from 0 to T=4"),
        (dict(input_ids=ids[0, :4], caches=caches, cu_seqlens=torch.tensor([0.0, 2.7, 4.0])), "cu_seqlens: expected dtype in"),
        (dict(input_ids=ids[0, :4], caches=caches, cu_seqlens=torch.tensor([[0, 2, 4]])), "cu_seqlens: expected 1 dimensions"),
        (dict(input_ids=ids[:, :1], caches=caches, budget=torch.tensor([1.0, 0.5, 0.5])),
         "budget: expected one value per sequence \\(2\\), got shape \\(3,\\)"),
        # Filled at the full budget: a request continues at the budget it started with.
        (dict(input_ids=ids[:, :1], caches=caches, budget=0.5), "heads: expected each request's KV cap as its cache was "
                                                                   "filled \\(request 0: 4 query heads\\), got 2"),
        (dict(input_ids=ids[:, :1], caches=caches, choices=[(128, torch.tensor([4, 3]))] * 2),
         "choices\\[0\\] heads: expected multiples of the GQA group size 2"),
        (dict(input_ids=ids[:, :1], caches=caches, choices=[(128, 3)] * 2),
         "choices\\[0\\] heads: expected a multiple of the GQA group size 2, got 3"),
        (dict(input_ids=ids[:, :1], caches=caches, choices=[(128, 4)]), "choices: expected one \\(mlp_width, heads\\) pair per layer \\(2\\), got 1"),
        (dict(input_ids=ids[:, :1], caches=caches, choices=[(129, 4)] * 2), "choices\\[0\\] mlp_width: expected an int in \\[0, 128\\]"),
        (dict(input_ids=ids[:, :1], caches=caches, choices=[(128, torch.tensor([4]))] * 2),
         "choices\\[0\\] heads: expected shape \\(2,\\), got \\(1,\\)"),
    ]
    with torch.no_grad():
        model(ids, caches=caches)
        before = [(c.seqlens.clone(), c.k.clone()) for c in caches]
        for kwargs, message in cases:
            with pytest.raises(ValueError if "dtype" not in message else TypeError, match=message):
                model.extend(**kwargs)
            for c, (seqlens, k) in zip(caches, before):
                assert torch.equal(c.seqlens, seqlens) and torch.equal(c.k, k), message
        assert model.extend(ids[:, :0], caches).shape == (2, 0, VOCAB)  # no new token: nothing changes
        caches[1].seqlens += 1
        with pytest.raises(ValueError, match="caches: expected every layer's cache to hold the same lengths"):
            model.extend(ids[:, :1], caches)
    with pytest.raises(ValueError, match="choices\\[1\\] heads: expected a multiple of the GQA group size 2, got 1"):
        model(ids, choices=[(128, 4), (128, 1)])  # the prefill refuses them too (they were silently wrong)
    with pytest.raises(ValueError, match="choices\\[0\\] heads: expected a multiple of the GQA group size 2, got 3"):
        model.decode_step(ids[:, 0], model.new_caches(2, 8), choices=[(128, 3)] * 2)  # and a decode step


def test_generate_refuses_caches_it_cannot_continue():
    model = FlextronForCausalLM.from_hf(hf_model("llama"), mlp_choices=[[64, 128, 192, 256]] * 2)
    ids = torch.randint(0, VOCAB, (2, 5))
    caches = model.new_caches(2, 40)
    caches[1] = model.new_caches(2, 12)[1]
    with pytest.raises(ValueError, match="caches: 12 positions, too few for the 0 a request holds, its prompt and "
                                         "max_new_tokens \\(15 in all\\)"):
        model.generate(ids, max_new_tokens=10, caches=caches)
    assert caches[0].seqlens.tolist() == [0, 0]
    with pytest.raises(ValueError, match="caches: expected one cache per layer \\(2\\)"):
        model.generate(ids, caches=caches[:1])
    with pytest.raises(ValueError, match="max_new_tokens: expected an int >= 0, got -2"):
        model.generate(ids, max_new_tokens=-2, caches=caches)
    caches = model.new_caches(2, 40)
    model.generate(ids, max_new_tokens=3, budget=1.0, caches=caches)
    with pytest.raises(ValueError, match="heads: expected each request's KV cap as its cache was filled"):
        model.generate(ids, max_new_tokens=3, budget=0.25, caches=caches)


def test_extend_records_the_token_routers_choices_of_its_own_call():
    model = FlextronForCausalLM.from_hf(hf_model("llama"), mlp_choices=[[64, 128, 192, 256]] * 2)
    model.attach_routers(hidden=16, static=False, token=True)
    model.eval()
    model.record_token_choices = True
    caches = model.new_caches(2, 40)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 5)), caches=caches)
        model.extend(torch.randint(0, VOCAB, (2, 3)), caches)
    assert len(model.token_router_choices) == 2 and model.token_router_choices[0].shape == (6,)


def test_a_request_first_filled_by_a_decode_step_extends_at_its_caps():
    model = FlextronForCausalLM.from_hf(hf_model("llama"))
    ids = torch.randint(0, VOCAB, (9,))
    budget = torch.tensor([1.0, 1.0])
    caches = model.new_caches(2, 16)
    with torch.no_grad():
        model(ids[:5], cu_seqlens=torch.tensor([0, 5, 5], dtype=torch.int32), budget=budget, caches=caches)  # request 1 empty
        model.decode_step(ids[5:7], caches, budget=budget)
        assert caches[0].heads.tolist() == [4, -1]  # a decode step records no cap (it would cost every step)
        got = model.extend(ids[7:9].repeat(2), caches, cu_seqlens=torch.tensor([0, 2, 4]), budget=budget)
        assert caches[0].heads.tolist() == [4, 4]
        whole = model(torch.cat([ids[6:7], ids[7:9]])[None], budget=1.0)[0]  # request 1: its decoded token, then these
    torch.testing.assert_close(got[2:], whole[1:], rtol=1e-5, atol=1e-5)


def test_forward_and_extend_of_empty_sequences(host_copies):
    model = FlextronForCausalLM.from_hf(hf_model("llama"))
    caches = model.new_caches(2, 8)
    with torch.no_grad():
        assert model(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, VOCAB)
        model(torch.randint(0, VOCAB, (2, 3)), caches=caches)
        host_copies.clear()
        model.extend(torch.randint(0, VOCAB, (2, 2)), caches)
    # One copy to the host for every check of every layer, and one per layer for the
    # attention's loop over the requests (their offsets): a check per layer made one more.
    assert len(host_copies) == 1 + len(model.layers), host_copies
