"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must
be set before ``triton`` is first imported, so it is set here, at collection.
"""

import os
import shutil
import subprocess


def _gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Import triton now, so that a test which changes TRITON_INTERPRET later (to check
    # backend selection) cannot make torch import it in compiled mode.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """Where kernels run: the GPU if there is one, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 tests compare at 1e-5: no TF32 anywhere."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def host_copies(monkeypatch):
    """Counts the copies of tensor values to the host (``tolist``, ``item``, ``int()``,
    ``bool()``, ...) made by the package's op layer: each one waits for the device."""
    import sys
    from pathlib import Path

    import flextron_kernels.ops

    # The op layer as imported: the checkout, or an installed copy (as in CI).
    ops_dir = Path(flextron_kernels.ops.__file__).resolve().parent
    calls = []
    for name in ("tolist", "item", "__int__", "__bool__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            if caller.parent == ops_dir:
                calls.append((_name, caller.name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls
