"""Argument checks shared by every op.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong device, rank, shape or value) with a message that names the argument, what
was expected and what was given.

Checking the *values* of a widths tensor (every width in range) needs one device to
host copy. It runs by default, except while a CUDA graph is being captured; set
``FLEXTRON_CHECK_WIDTHS=0`` or use :func:`skip_width_value_checks` to skip it on a
hot path whose widths come from trusted code (a router's argmax). Code traced by
``torch.compile`` skips it too.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Iterator, Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_skip_values: contextvars.ContextVar[bool] = contextvars.ContextVar("flextron_skip_width_values", default=False)


@contextlib.contextmanager
def skip_width_value_checks() -> Iterator[None]:
    """Inside the block, widths tensors are not copied to the host to check their range."""
    if torch.compiler.is_compiling():  # traced code skips them anyway, and cannot set a ContextVar
        yield
        return
    token = _skip_values.set(True)
    try:
        yield
    finally:
        _skip_values.reset(token)


def value_checks_enabled(t: torch.Tensor) -> bool:
    # A traced graph cannot copy to the host; compiled code relies on eager runs' checks.
    if torch.compiler.is_compiling():
        return False
    if _skip_values.get() or os.environ.get("FLEXTRON_CHECK_WIDTHS", "1") == "0":
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def poison_outputs() -> bool:
    """Whether ``FLEXTRON_POISON_OUTPUTS=1`` (read at each call: the tests set it)."""
    return os.environ.get("FLEXTRON_POISON_OUTPUTS", "0") == "1"


def new_output(shape, *, dtype: torch.dtype, device: torch.device, poison: Optional[bool] = None) -> torch.Tensor:
    """An uninitialised output buffer; filled with NaN (integers: -999999) when
    ``FLEXTRON_POISON_OUTPUTS=1`` (the tests set it, so that an element a kernel
    forgets to write fails). ``poison``: that setting, read once by a caller that
    allocates several buffers."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs() if poison is None else poison:
        out.fill_(float("nan") if out.is_floating_point() else -999999)
    return out


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    shape: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({', '.join(map(str, dtypes))}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the other inputs), got {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def check_same_dtype(name: str, t: torch.Tensor, dtype: torch.dtype, other: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of {other}), got {t.dtype}")


def check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected an int in [{low}, {high}], got {value}")
    return value


def host_values(*tensors: torch.Tensor) -> list[list[int]]:
    """The values of small integer (or bool) tensors, as lists, copied to the host together:
    one transfer, one wait for the device, however many tensors an op's checks need."""
    flat = [t.reshape(-1).to(torch.int64) for t in tensors]
    values = torch.cat(flat).tolist() if flat else []
    lists, start = [], 0
    for t in flat:
        lists.append(values[start:start + t.numel()])
        start += t.numel()
    return lists


def width_range(widths: torch.Tensor) -> torch.Tensor:
    """``[min, max]`` of a non-empty widths tensor, on its device (for :func:`host_values`)."""
    return torch.stack(torch.aminmax(widths))


def off_group(counts: torch.Tensor, group: int) -> torch.Tensor:
    """``[whether any count is not a multiple of group, the first such index, its count]`` of
    a non-empty head-counts tensor, on its device (for :func:`host_values`)."""
    bad = counts % group != 0
    first = bad.to(torch.int32).argmax()
    return torch.stack([bad.any().to(torch.int64), first.to(torch.int64), counts[first].to(torch.int64)])


def check_width_range(name: str, low_seen: int, high_seen: int, high: int) -> None:
    if low_seen < 0 or high_seen > high:
        raise ValueError(f"{name}: expected every width in [0, {high}], got values in [{low_seen}, {high_seen}]")


def check_widths(
    name: str,
    widths: Union[None, int, torch.Tensor],
    *,
    high: int,
    default: int,
    token_shape: Sequence[int],
    device: torch.device,
    check_values: bool = True,
) -> tuple[Optional[torch.Tensor], int]:
    """Normalise a width argument: None (full), an int, or a per-token integer tensor.

    Returns ``(per_token, static)``: ``per_token`` is the tensor flattened to ``[T]``
    (or None), ``static`` is the int width (``high`` for a per-token argument).
    ``check_values=False``: the caller checks a tensor's range itself
    (:func:`check_width_range`), with its other values in one transfer.
    """
    if widths is None:
        return None, default
    if not isinstance(widths, torch.Tensor):
        return None, check_int(name, widths, 0, high)
    if widths.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (int32 or int64), got dtype {widths.dtype}")
    if widths.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of x), got {widths.device}")
    if tuple(widths.shape) != tuple(token_shape):
        raise ValueError(f"{name}: expected shape {tuple(token_shape)} (x.shape[:-1]), got {tuple(widths.shape)}")
    flat = widths.reshape(-1)
    if check_values and flat.numel() and value_checks_enabled(flat):
        check_width_range(name, *host_values(width_range(flat))[0], high)
    return flat, high


def softmax_scale_or_default(softmax_scale: object, head_dim: int) -> float:
    """An attention call's ``softmax_scale``, checked (a finite float > 0: the kernels
    scale each row's maximum score), or ``head_dim ** -0.5`` when it is None."""
    if softmax_scale is None:
        return head_dim**-0.5
    try:  # any real number (a numpy float, a 0-d tensor), but not a bool or a string
        if isinstance(softmax_scale, (bool, str, bytes)):
            raise TypeError
        value = float(softmax_scale)
    except (TypeError, ValueError):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}") from None
    except OverflowError:
        value = math.inf
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"softmax_scale: expected a finite float > 0, got {softmax_scale!r}")
    return value


def check_cu_seqlens_values(values: Sequence[int], num_tokens: int) -> None:
    """``cu_seqlens`` (on the host, as a list) must rise from 0 to ``num_tokens``."""
    if values[0] != 0 or values[-1] != num_tokens or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T={num_tokens}, got {list(values)}")

