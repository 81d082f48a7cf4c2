"""The reference against the issue's definitions, written as loops over tokens."""

import pytest
import torch

from flextron_kernels import reference


@pytest.mark.parametrize("seed", range(3))
def test_elastic_linear_reference_matches_per_token_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    n_full, k_full, num_tokens = 9, 7, 6
    x = torch.randn(num_tokens, k_full, generator=gen, dtype=torch.float64)
    w = torch.randn(n_full, k_full, generator=gen, dtype=torch.float64)
    b = torch.randn(n_full, generator=gen, dtype=torch.float64)
    out_w = torch.randint(0, n_full + 1, (num_tokens,), generator=gen)
    in_w = torch.randint(0, k_full + 1, (num_tokens,), generator=gen)

    y = reference.elastic_linear(x, w, b, out_features=out_w, in_features=in_w)
    assert y.shape == (num_tokens, n_full)
    for t in range(num_tokens):
        n, k = int(out_w[t]), int(in_w[t])
        expected = x[t, :k] @ w[:n, :k].T + b[:n]
        torch.testing.assert_close(y[t, :n], expected)
        assert (y[t, n:] == 0).all()

    # Static widths: y = x[..., :k] @ W[:n, :k].T + b[:n], for x [..., K] or [..., k].
    torch.testing.assert_close(reference.elastic_linear(x, w, b, out_features=4, in_features=3), x[:, :3] @ w[:4, :3].T + b[:4])
    torch.testing.assert_close(reference.elastic_linear(x[:, :3], w, b, out_features=4, in_features=3), x[:, :3] @ w[:4, :3].T + b[:4])
    # max_out_features bounds the output width.
    small = out_w.clamp(max=5)
    assert reference.elastic_linear(x, w, out_features=small, max_out_features=5).shape == (num_tokens, 5)


def test_elastic_linear_reference_is_differentiable():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    widths = torch.tensor([0, 2, 5])
    assert torch.autograd.gradcheck(lambda x, w: reference.elastic_linear(x, w, out_features=widths, in_features=widths.clamp(max=4)), (x, w))
