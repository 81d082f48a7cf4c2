"""FlextronEncoder: conversion from Hugging Face BERT, padding, budgets, sentence embeddings."""

import pytest
import torch

from flextron_kernels.models import FlextronEncoder

transformers = pytest.importorskip("transformers", reason="the encoder tests build Hugging Face models")


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def batch():
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("calibrate", [False, True])
def test_conversion_reproduces_hf_bert(calibrate):
    hf = bert()
    model = FlextronEncoder.from_hf(hf, calibration=torch.randint(0, 97, (2, 16)) if calibrate else None)
    ids, mask = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
        out = model(ids, mask)
        used = mask.bool()
        scale = ref.last_hidden_state.abs().max()
        assert ((out - ref.last_hidden_state)[used].abs().max() / scale) < 1e-4
        assert (out[~used] == 0).all()
        torch.testing.assert_close(model.encode(ids, mask, pooling="pooler"), ref.pooler_output, rtol=1e-4, atol=1e-5)


def test_budgets_and_pooling():
    model = FlextronEncoder.from_hf(bert(), calibration=torch.randint(0, 97, (2, 16)), mlp_choices=[[64, 128, 192, 256]] * 2)
    ids, mask = batch()
    budgets = torch.tensor([1.0, 0.5, 0.25])
    with torch.no_grad():
        mixed = model.encode(ids, mask, budget=budgets)
        for i, b in enumerate(budgets.tolist()):
            alone = model.encode(ids[i : i + 1], mask[i : i + 1], budget=b)
            torch.testing.assert_close(mixed[i], alone[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model.encode(ids, mask, budget=0.25), model.encode(ids, mask))
        cls = model.encode(ids, mask, pooling="cls")
        torch.testing.assert_close(cls, model(ids, mask)[:, 0])
    with pytest.raises(ValueError, match="pooling: expected one of mean, cls, pooler, got 'max'"):
        model.encode(ids, mask, pooling="max")
    # The budgets are checked once, before the layers (which skip their ops' value checks).
    with pytest.raises(ValueError, match="budget: expected values in \\(0, 1\\]"):
        model.encode(ids, mask, budget=torch.tensor([1.0, 1.5, 0.25]))


def test_bad_input():
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="model_type: expected one of bert, got 'gpt2'"):
        FlextronEncoder.from_hf(gpt2)
    with pytest.raises(ValueError, match="calibration: expected token ids or text, got no tokens"):
        FlextronEncoder.from_hf(bert(), calibration=[])
