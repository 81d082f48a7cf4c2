"""Pieces shared by the ops: kernel tile configurations, token grouping, masking, and
the prefix-accumulating gradient policy."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import Iterator, Optional

import torch

from flextron_kernels import backends
from flextron_kernels.ops import checks, tiles
from flextron_kernels.ops.routing import compute_routing_metadata, default_boundaries
from flextron_kernels.reference import RoutingMetadata

_full_size_grads: contextvars.ContextVar[bool] = contextvars.ContextVar("flextron_full_size_grads", default=False)


@contextlib.contextmanager
def full_size_weight_grads() -> Iterator[None]:
    """Inside the block, weight gradients go through autograd at full size (for
    ``torch.autograd.grad``, gradient hooks, or wrappers that need them)."""
    token = _full_size_grads.set(True)
    try:
        yield
    finally:
        _full_size_grads.reset(token)


def accumulates_in_place(*params: Optional[torch.Tensor]) -> bool:
    """Whether the backward adds weight gradients straight into the used prefix of
    ``.grad``: in eager mode, for ``nn.Parameter`` leaves (the ``None`` entries and
    those not requiring grad are ignored), unless :func:`full_size_weight_grads`."""

    def fits(t):
        return t is None or not t.requires_grad or (isinstance(t, torch.nn.Parameter) and t.is_leaf)

    return (
        not torch.compiler.is_compiling()
        and torch.is_grad_enabled()
        and not _full_size_grads.get()
        and all(fits(p) for p in params)
    )


_DISPATCH_SETTINGS = (backends._override, checks._skip_values, tiles._overrides)


def dispatch_state() -> Optional[tuple]:
    """The dispatch settings in force: :func:`~flextron_kernels.use_backend`,
    :func:`~flextron_kernels.skip_width_value_checks`, :func:`~flextron_kernels.ops.tiles.override_tiles`.
    A forward saves them for its backward: on a GPU, autograd runs the backward on a
    thread of its own, where they would be unset. None while ``torch.compile`` traces
    (it cannot read context variables; compiled code keeps the backward thread's own)."""
    if torch.compiler.is_compiling():
        return None
    return tuple(setting.get() for setting in _DISPATCH_SETTINGS)


@contextlib.contextmanager
def dispatch_state_restored(state: Optional[tuple]) -> Iterator[None]:
    """Inside the block, the dispatch settings are those :func:`dispatch_state` saved."""
    if state is None:
        yield
        return
    tokens = [setting.set(value) for setting, value in zip(_DISPATCH_SETTINGS, state)]
    try:
        yield
    finally:
        for setting, token in zip(reversed(_DISPATCH_SETTINGS), reversed(tokens)):
            setting.reset(token)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
# functorch's wrapped tensors (vmap, grad transforms) are plain by type; None: unknown.
_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def runs_directly(*args) -> bool:
    """Whether a custom op called with ``args`` and its implementation called with them are
    the same but for the dispatcher's host time (tens of microseconds a call, which small
    batches and decode steps feel): in eager mode, with no gradient to record, on plain
    tensors off the meta device and with no dispatch mode (fake tensors, tracing) that
    needs the op's registrations. ``torch.compile``, ``torch.jit.trace`` and the profiler
    (whose traces name the ops) always see the op."""
    profiling = getattr(torch.autograd.profiler, "_is_profiler_enabled", True)  # unknown: take the op
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or profiling:
        return False
    stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
    if stack_len is None or stack_len() > 0:
        return False
    grad = torch.is_grad_enabled()
    # A plain loop: this runs on every call of every op, where a generator's setup showed.
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TYPES or a.is_meta or (grad and a.requires_grad):
                return False
            if _functorch_wrapped is None or _functorch_wrapped(a):
                return False
    return True


def mark_written(*tensors: Optional[torch.Tensor]) -> None:
    """Bump the version counters of tensors a kernel wrote in place (through raw pointers,
    which autograd does not see), as the custom ops' ``mutates_args`` would."""
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def call_op(op, impl, *args, **impl_only):
    """``impl(*args, **impl_only)`` where :func:`runs_directly`, else the custom op
    ``op(*args)``. ``impl_only``: what the implementation may take ready-made instead of
    computing it (an autograd function's token grouping, shared by its forward and backward)."""
    return impl(*args, **impl_only) if runs_directly(*args) else op(*args)


def _autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs matmuls in on ``t``'s device, or None outside it."""
    device_type = t.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def outside_autocast(*cast: str):
    """Decorator of a public op: under ``torch.autocast`` the op casts its floating tensor
    arguments named in ``cast`` to autocast's dtype and runs with autocast off, as autocast
    treats ``F.linear`` and ``F.scaled_dot_product_attention`` (so both backends, and the
    ops' fake results, agree on the output dtype). ``cast[0]``, the op's first parameter,
    gives the device."""

    def decorate(fn):
        signature = inspect.signature(fn)
        assert next(iter(signature.parameters)) == cast[0], (fn.__name__, cast)

        @functools.wraps(fn)
        def op(*args, **kwargs):
            first = args[0] if args else kwargs.get(cast[0])
            dtype = _autocast_dtype(first) if isinstance(first, torch.Tensor) else None
            if dtype is None:
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            for name in cast:
                t = bound.arguments.get(name)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    bound.arguments[name] = t.to(dtype)
            with torch.autocast(first.device.type, enabled=False):
                return fn(*bound.args, **bound.kwargs)

        return op

    return decorate


def grad_buffer(param: torch.Tensor) -> torch.Tensor:
    """``param.grad``, allocated as zeros on first use."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def mask_columns(t: torch.Tensor, widths: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero ``t[i, j]`` for ``j >= widths[i]`` (a select, so NaN/inf there are dropped)."""
    if widths is None:
        return t
    keep = torch.arange(t.shape[1], device=t.device) < widths.unsqueeze(1)
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


# A CPU reads the widths for free: it computes runs of tokens of like width, each at its
# own width, in at most this many runs (the loop's per-run cost bounds it).
MAX_TORCH_RUNS = 8


def torch_runs(widths: Optional[torch.Tensor], fw: int) -> list:
    """The token sets the torch backend computes together: ``(rows, width, mask_widths)``
    with ``rows`` int64 token indices (None: every token, in order), the width the set is
    computed at, and per-token widths to mask it with (None: every token of the set uses
    all of it). On a CPU: the tokens sorted by width, in one run per distinct width or, with
    more than :data:`MAX_TORCH_RUNS` of them, that many runs of equal size, each at its
    widest token's width. Elsewhere (no host sync; capturable in a CUDA graph): every
    token at ``fw``, masked."""
    if widths is None:
        return [(None, fw, None)]
    if widths.device.type != "cpu" or widths.numel() == 0:
        return [(None, fw, widths)]
    sorted_widths, order = torch.sort(widths, stable=True)
    values, counts = torch.unique_consecutive(sorted_widths, return_counts=True)
    if values.numel() == 1:
        return [(None, int(values[0]), None)]
    num_tokens = widths.numel()
    if values.numel() <= MAX_TORCH_RUNS:
        ends = counts.cumsum(0).tolist()
    else:
        ends = [-(-num_tokens * (i + 1) // MAX_TORCH_RUNS) for i in range(MAX_TORCH_RUNS)]
    runs, start = [], 0
    for end in ends:
        rows, run_widths = order[start:end], sorted_widths[start:end]
        uniform = bool(run_widths[0] == run_widths[-1])
        runs.append((rows, int(run_widths[-1]), None if uniform else run_widths))
        start = end
    return runs


def torch_rows(t: Optional[torch.Tensor], rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t``'s rows ``rows`` (a run of :func:`torch_runs`; None: all of them)."""
    return t if (t is None or rows is None) else t.index_select(0, rows)


def assemble_runs(shape, like, run_values):
    """A ``shape`` tensor assembled from each run's (:func:`torch_runs`) ``(rows, limit,
    values)``: ``values`` in its rows' first ``limit`` columns, zeros elsewhere (one run
    over every row and column: ``values`` itself)."""
    if len(run_values) == 1 and run_values[0][0] is None and run_values[0][1] == shape[1]:
        return run_values[0][2]
    t = like.new_zeros(shape)
    for rows, limit, values in run_values:
        if rows is None:
            t[:, :limit] = values
        else:
            t[rows, :limit] = values
    return t


def boundaries_for(widths: Optional[torch.Tensor], size: int) -> Optional[torch.Tensor]:
    """The default group boundaries for per-token ``widths`` in ``[0, size]`` (None for static widths)."""
    return None if widths is None else default_boundaries(max(size, 1), widths.device)


def matmul_routing(widths: Optional[torch.Tensor], size: int, num_rows: int, block_m: int,
                   grouped: Optional[RoutingMetadata] = None) -> Optional[RoutingMetadata]:
    """Routing metadata for a routed matmul over ``num_rows`` rows with per-row ``widths``
    in ``[0, size]``; None (unrouted rows, masked at their widths) when every row fits in
    one tile of ``block_m``: there, grouping would only make each group's tile read the
    weight prefix it shares with the others again (a decode batch of four budgets would
    read 2.5x the widest prefix instead of 1x). ``grouped``: the caller's
    :func:`group_tokens` of the same widths, reused."""
    if widths is None or num_rows <= block_m:
        return None
    return grouped if grouped is not None else group_tokens(widths, size, block_m)[0]


def group_tokens(
    widths: Optional[torch.Tensor], size: int, block_m: int
) -> tuple[Optional[RoutingMetadata], Optional[torch.Tensor]]:
    """Routing metadata for per-token ``widths`` in ``[0, size]`` (default grouping), and
    the group boundaries; ``(None, None)`` for static widths."""
    boundaries = boundaries_for(widths, size)
    if boundaries is None:
        return None, None
    # The default boundaries are valid by construction: no check (a host sync), and this
    # runs inside an op's implementation, so no custom op either.
    return compute_routing_metadata(widths, boundaries, block_m), boundaries
