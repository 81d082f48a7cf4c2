"""Backend selection: which implementation of an op runs.

Backends:
- ``torch``: plain PyTorch, vectorised; runs on any device.
- ``triton``: Triton kernels; on CUDA tensors, or on CPU tensors under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported).
- ``cuda``: the compiled extension ``flextron_kernels._C`` (its CUDA part on CUDA
  tensors, its C++ part on CPU tensors), for the ops it implements.

``auto`` (the default) picks, per op and per call, the fastest implementation the
op has for the tensors' device. An op with no implementation in the requested
backend (routing metadata has no Triton kernel) uses its own choice. ``FLEXTRON_BACKEND=torch|triton|cuda|auto`` sets
the default; :func:`use_backend` overrides it inside a ``with`` block. Asking for a
backend that cannot run here is an error that names the ones that can.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("flextron_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source}: expected one of {', '.join(_CHOICES)}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for now: the innermost :func:`use_backend`, else ``FLEXTRON_BACKEND``, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    return _env_backend(os.environ.get("FLEXTRON_BACKEND"))


@functools.lru_cache(maxsize=16)
def _env_backend(value: str | None) -> str:
    """``FLEXTRON_BACKEND``'s value, checked once per distinct value (every op call reads it)."""
    return _check_name((value or "auto").strip().lower() or "auto", "FLEXTRON_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block with backend ``name`` (``auto``, ``torch``, ``triton`` or ``cuda``)."""
    token = _override.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


# --------------------------------------------------------------------------- #
# What can run here
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension():
    """The compiled extension module, or None when it was not built."""
    return _load_extension()[0]


def extension_error() -> str | None:
    """Why the extension could not be imported (None when it was)."""
    return _load_extension()[1]


@functools.lru_cache(maxsize=None)
def _load_extension():
    if os.environ.get("FLEXTRON_DISABLE_EXT", "0") == "1":
        return None, "disabled by FLEXTRON_DISABLE_EXT=1"
    try:
        from flextron_kernels import _C
    except ImportError as err:
        return None, str(err)
    return _C, None


@functools.lru_cache(maxsize=None)
def extension_has_cuda() -> bool:
    ext = extension()
    return ext is not None and bool(ext.build_info()["cuda"])


def device_index(device: torch.device) -> int:
    """The CUDA device number of ``device`` (the current device when it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def backend_usable(name: str, device_type: str) -> bool:
    """Whether backend ``name`` can run at all on a device of this type (``cpu``/``cuda``)."""
    if name == "torch":
        return True
    if name == "triton":
        if not triton_importable():
            return False
        return triton_interpreter() if device_type == "cpu" else device_type == "cuda"
    if name == "cuda":
        if device_type == "cpu":
            return extension() is not None
        return device_type == "cuda" and extension_has_cuda()
    return False


def usable_backends(device_type: str) -> list[str]:
    return [name for name in BACKENDS if backend_usable(name, device_type)]


def select_backend(op: str, device: torch.device, implemented: Sequence[str], preferred: Sequence[str]) -> str:
    """Choose the backend for one call of ``op`` on ``device``.

    Args:
        op: the op's name, for error messages.
        implemented: the backends this op has for this device type.
        preferred: under ``auto``, the order in which to try them.
    """
    requested = requested_backend()
    device_type = device.type
    if requested != "auto" and not backend_usable(requested, device_type):
        raise ValueError(
            f"{op}: backend {requested!r} is not available for {device_type} tensors here; "
            f"available: {', '.join(usable_backends(device_type))} (set FLEXTRON_BACKEND or use_backend() to one of them)"
        )
    if requested in implemented:
        return requested
    # `auto`, or a backend this op has no implementation in (routing metadata has no
    # Triton kernel, say): the op's own preference among what can run here.
    for name in preferred:
        if name in implemented and backend_usable(name, device_type):
            return name
    raise RuntimeError(f"{op}: no backend can run on {device_type} tensors here (implemented: {list(implemented)})")


def build_info() -> dict:
    """What was built and what can run here.

    Keys: ``version``, ``extension`` (bool), ``extension_error``, ``extension_build``
    (the extension's own report: CUDA archs, compiler, CUDA version), ``torch``,
    ``torch_cuda``, ``triton``, ``cuda_available``, ``device``, ``triton_interpreter``
    and ``backends`` (usable backends per device type).
    """
    from flextron_kernels import __version__

    ext = extension()
    triton_version = None
    if triton_importable():
        import triton

        triton_version = triton.__version__
    cuda_available = torch.cuda.is_available()
    return {
        "version": __version__,
        "extension": ext is not None,
        "extension_error": extension_error(),
        "extension_build": dict(ext.build_info()) if ext is not None else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpreter": triton_interpreter(),
        "cuda_available": cuda_available,
        "device": torch.cuda.get_device_name() if cuda_available else "cpu",
        "backends": {"cpu": usable_backends("cpu"), "cuda": usable_backends("cuda") if cuda_available else []},
    }
