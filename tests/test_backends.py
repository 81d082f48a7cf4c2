"""Backend selection, build_info, and the package importing without the extension."""

import os
import subprocess
import sys

import pytest
import torch

import flextron_kernels as fk
from flextron_kernels.backends import requested_backend, select_backend


def test_use_backend_nests_and_restores():
    base = requested_backend()
    with fk.use_backend("torch"):
        assert requested_backend() == "torch"
        with fk.use_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "torch"
    assert requested_backend() == base


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend: expected one of auto, torch, triton, cuda, got 'cublas'"):
        with fk.use_backend("cublas"):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FLEXTRON_BACKEND", "torch")
    assert requested_backend() == "torch"
    monkeypatch.setenv("FLEXTRON_BACKEND", "fast")
    with pytest.raises(ValueError, match="FLEXTRON_BACKEND: expected one of"):
        requested_backend()


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fk.use_backend("triton"):
        with pytest.raises(ValueError, match="backend 'triton' is not available for cpu tensors here; available: torch"):
            fk.elastic_linear(torch.randn(2, 3), torch.randn(4, 3))


def test_auto_prefers_in_order():
    cpu = torch.device("cpu")
    assert select_backend("op", cpu, ("triton", "torch"), ("torch", "triton")) == "torch"
    with fk.use_backend("triton"):
        expected = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else None
        if expected:
            assert select_backend("op", cpu, ("triton", "torch"), ("torch", "triton")) == "triton"
            # An op with no Triton implementation uses its own choice.
            assert select_backend("op", cpu, ("cuda", "torch"), ("cuda", "torch")) in ("cuda", "torch")


def test_build_info_keys():
    info = fk.build_info()
    for key in ("version", "extension", "extension_build", "torch", "triton", "cuda_available", "backends"):
        assert key in info
    assert info["version"] == fk.__version__
    assert "torch" in info["backends"]["cpu"]
    if info["extension"]:
        assert set(info["extension_build"]) >= {"cuda", "cuda_archs", "cxx_compiler"}


@pytest.mark.skipif(os.environ.get("FLEXTRON_EXPECT_EXT") != "1", reason="the test command did not ask for the extension")
def test_extension_was_built_and_installed():
    info = fk.build_info()
    assert info["extension"], f"flextron_kernels._C did not import: {info['extension_error']}"
    assert "cuda" in info["backends"]["cpu"]


def test_package_works_without_extension():
    code = (
        "import torch, flextron_kernels as fk\n"
        "info = fk.build_info()\n"
        "assert not info['extension'] and 'cuda' not in info['backends']['cpu'], info\n"
        "w = torch.tensor([3, 0, 5])\n"
        "m = fk.routing_metadata(w, torch.tensor([2, 5]), 2)\n"
        "assert m.sorted_token_idx.tolist() == [1, 0, 2]\n"
        "y = fk.elastic_linear(torch.randn(3, 4), torch.randn(5, 4), out_features=w)\n"
        "assert (y[1] == 0).all()\n"
    )
    env = dict(os.environ, FLEXTRON_DISABLE_EXT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
