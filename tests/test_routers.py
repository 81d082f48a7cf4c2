"""Routers: budget encoding, straight-through selection, and their use inside the model."""

import pytest
import torch

from flextron_kernels.models import FlextronConfig, FlextronForCausalLM
from flextron_kernels.models.routers import StaticRouter, TokenRouter, encode_budget, select


def test_budget_encoding_interpolates_between_trained_budgets():
    trained = torch.tensor([0.25, 0.5, 0.75, 1.0])
    code = encode_budget(torch.tensor([0.25, 0.375, 1.0, 0.1, 0.9]), trained)
    expected = torch.tensor([
        [1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0.4, 0.6],
    ])
    torch.testing.assert_close(code, expected)


def test_select_is_argmax_at_inference_and_straight_through_in_training():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]], requires_grad=True)
    index, scale = select(logits, training=False)
    assert index.tolist() == [1, 0] and (scale == 1).all() and not scale.requires_grad
    index, scale = select(logits, training=True, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert (scale.detach() == 1).all()
    scale.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_router_shapes():
    router = StaticRouter([0.5, 1.0], n_layers=3, mlp_choices=4, head_choices=2, hidden=8)
    mlp, heads = router(torch.tensor([0.5, 0.7]))
    assert mlp.shape == (2, 3, 4) and heads.shape == (2, 3, 2)
    assert TokenRouter(16, 2, 4, hidden=8)(torch.randn(5, 16), torch.rand(5, 2)).shape == (5, 4)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = FlextronConfig(arch="llama", vocab_size=53, d_model=32, n_layers=2, q_heads=4, kv_heads=2, ffn=64,
                            mlp_choices=[[16, 32, 48, 64]] * 2)
    return FlextronForCausalLM(config).eval()


def test_static_router_choices_drive_the_model():
    model = tiny_model()
    reference = tiny_model()
    model.attach_routers(hidden=8)
    with torch.no_grad():  # make the router pick the smallest width and head count
        for head in (model.static_router.mlp, model.static_router.heads):
            head[-1].weight.zero_()
            head[-1].bias.copy_(torch.tensor([10.0] + [0.0] * (head[-1].bias.numel() // 2 - 1)).repeat(2))
    ids = torch.randint(0, 53, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, budget=0.9), reference(ids, budget=0.25))
        torch.testing.assert_close(model(ids, budget=torch.tensor([0.9, 0.3])), reference(ids, budget=0.25))


def test_routers_get_gradients_in_training():
    model = tiny_model()
    model.attach_routers(hidden=8, static=True, token=True)
    model.train()
    ids = torch.randint(0, 53, (2, 6))
    logits = model(ids, budget=torch.tensor([0.5, 1.0]))
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 53), ids[:, 1:].reshape(-1)).backward()
    for name, module in (("static", model.static_router), ("token", model.token_routers)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name


@pytest.mark.parametrize("token", [False, True])
def test_generation_with_routers_matches_recompute(token):
    model = tiny_model(1)
    model.attach_routers(hidden=8, static=True, token=token)
    prompts = torch.randint(0, 53, (2, 5))
    budget = torch.tensor([0.5, 1.0])
    out = model.generate(prompts, budget=budget, max_new_tokens=4)
    ids = prompts
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(ids, budget=budget)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_attach_routers_needs_equal_choice_counts():
    config = FlextronConfig(arch="llama", vocab_size=10, d_model=16, n_layers=2, q_heads=2, kv_heads=2, ffn=32,
                            mlp_choices=[[16, 32], [8, 16, 32]])
    with pytest.raises(ValueError, match="attach_routers: every layer needs the same number of choices"):
        FlextronForCausalLM(config).attach_routers()
