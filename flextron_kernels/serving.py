"""A small serving loop: requests with their own budgets, batched together.

Continuous batching: requests join (prefilled together, packed, into free slots of the
KV cache) and leave (when done; the last slot moves into the hole, so the active requests always
hold slots ``0..n-1``) between decode steps. Each decode step runs every active request
at its own budget in one batch: when all share one budget, the layers run at that
budget's static widths; otherwise each request's MLP width and head count go to the ops
as per-request tensors. On a GPU, the decode step is captured in a CUDA graph per
(batch-size bucket, budget mix) and replayed.

Usage::

    server = Server(model, max_batch=16, max_len=2048)
    for event in server.stream([Request([1, 2, 3], budget=0.5), Request([4, 5], budget=1.0)]):
        print(event.request_id, event.token, event.finished)

A bad request (budget out of range, prompt longer than the cache, a full queue) ends at
once with ``finish_reason == "error"`` and a message; the other requests go on.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import deque
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from flextron_kernels.models.graphs import capture
from flextron_kernels.nn import KVCache
from flextron_kernels.ops.checks import skip_width_value_checks


@dataclasses.dataclass
class Request:
    """One generation request.

    ``prompt``: token ids (an iterable of ints or a 1-D integer tensor), at least one;
    ``budget``: in (0, 1]; ``max_new_tokens`` >= 1; ``temperature`` 0 is greedy, else
    sampling with optional ``top_k`` / ``top_p`` from a generator seeded with ``seed``;
    generation stops after ``eos_token_id``."""

    prompt: Union[Sequence[int], torch.Tensor]
    budget: float = 1.0
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    eos_token_id: Optional[int] = None
    seed: Optional[int] = None


@dataclasses.dataclass
class TokenEvent:
    """A streamed token (``token`` is None for a request that failed)."""

    request_id: int
    token: Optional[int]
    finished: bool
    finish_reason: Optional[str] = None  # "length", "eos" or "error" once finished
    error: Optional[str] = None


@dataclasses.dataclass
class Completion:
    request_id: int
    tokens: list
    finish_reason: str
    error: Optional[str] = None


@dataclasses.dataclass
class _Active:
    request_id: int
    request: Request
    choices: tuple  # per layer (mlp_width, heads) at the budget as admitted
    length: int  # tokens in the cache
    generated: list
    generator: Optional[torch.Generator]


def _prompt_list(prompt) -> list:
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex():
            raise TypeError("prompt")
        return prompt.tolist()
    if isinstance(prompt, (str, bytes)):
        raise TypeError("prompt")
    return list(prompt)


class Server:
    """Serves a :class:`~flextron_kernels.models.FlextronForCausalLM` (any budget per request).

    Args:
        model: the model (its device and dtype are used; the server puts it in eval mode).
        max_batch: most requests decoded together (the KV cache's batch size).
        max_len: cache positions per request (prompt + new tokens).
        max_queue: most requests waiting for a slot (beyond those the free slots will take
            at the next step); beyond, a request fails at once.
        cuda_graphs: capture decode steps in CUDA graphs (default: on a GPU).
        buckets: batch sizes that get a graph of their own (default powers of two up
            to ``max_batch``); a step runs the smallest bucket that holds its requests.
            Without graphs a step runs just its requests, unless ``buckets`` is given.
        max_prefill_tokens: most prompt tokens prefilled together in one step (a longer
            prompt is prefilled alone).
    """

    def __init__(self, model, *, max_batch: int = 16, max_len: int = 2048, max_queue: int = 1024,
                 cuda_graphs: Optional[bool] = None, buckets: Optional[Sequence[int]] = None,
                 max_prefill_tokens: int = 8192):
        for name, value in (("max_batch", max_batch), ("max_len", max_len), ("max_prefill_tokens", max_prefill_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue: expected an int >= 0, got {max_queue!r}")
        self.model = model.eval()
        self.config = model.config
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.config.check_positions(max_len, "max_len")
        weight = model.embed.weight
        self.device = weight.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs: CUDA graphs need the model on a CUDA device")
        sizes = sorted(set(buckets)) if buckets else [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
        if any(b < 1 or b > max_batch for b in sizes):
            raise ValueError(f"buckets: expected sizes in [1, {max_batch}], got {list(buckets)}")
        self.buckets = sorted(set(sizes) | {max_batch})
        self.pad_to_buckets = self.cuda_graphs or buckets is not None
        self.caches = model.new_caches(max_batch, max_len)
        n_layers = len(self.caches)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.budgets = torch.ones(max_batch, dtype=torch.float32, device=self.device)
        # int32: the MLP kernels take widths in int32 (no cast per layer and step)
        self.widths = torch.zeros(n_layers, max_batch, dtype=torch.int32, device=self.device)
        self.heads = torch.zeros(n_layers, max_batch, dtype=torch.long, device=self.device)
        self.active: list[_Active] = []
        self.waiting: deque = deque()
        self._ids = itertools.count()
        self._choices: dict = {}
        self._graphs: dict = {}
        self._pool = None
        self._failed: list[TokenEvent] = []

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. A bad request is not raised: it finishes at
        the next :meth:`step` with ``finish_reason="error"``."""
        request_id = next(self._ids)
        error, prompt = self._check(request)
        free_slots = self.max_batch - len(self.active)
        if error is None and len(self.waiting) >= self.max_queue + max(free_slots, 0):
            error = (f"server is full: {len(self.active)} running (max_batch={self.max_batch}) and "
                     f"{len(self.waiting)} waiting (max_queue={self.max_queue})")
        if error is not None:
            self._failed.append(TokenEvent(request_id, None, True, "error", error))
        else:
            self.waiting.append((request_id, request, prompt))
        return request_id

    def _check(self, r: Request) -> tuple[Optional[str], Optional[list]]:
        """``(error message or None, the prompt as a list of ints)``."""
        if not isinstance(r, Request):
            return f"request: expected a Request, got {type(r).__name__}", None
        try:
            prompt = _prompt_list(r.prompt)  # read once: the prompt may be an iterator
        except TypeError:
            return f"prompt: expected a sequence of int token ids or a 1-D tensor, got {type(r.prompt).__name__}", None
        error = self._request_error(r, prompt)
        return error, None if error else prompt

    def _request_error(self, r: Request, prompt: list) -> Optional[str]:
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return "prompt: expected a non-empty sequence of int token ids"
        vocab = self.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            return f"prompt: expected token ids in [0, {vocab}), got values in [{min(prompt)}, {max(prompt)}]"
        budget = r.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            return f"budget: expected a float in (0, 1], got {budget!r}"
        if isinstance(r.max_new_tokens, bool) or not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
            return f"max_new_tokens: expected an int >= 1, got {r.max_new_tokens!r}"
        if len(prompt) + r.max_new_tokens > self.max_len:
            return (f"prompt: {len(prompt)} tokens + max_new_tokens={r.max_new_tokens} exceed the cache "
                    f"(max_len={self.max_len})")
        if isinstance(r.temperature, bool) or not isinstance(r.temperature, (int, float)) or not (
                math.isfinite(r.temperature) and r.temperature >= 0):
            return f"temperature: expected a finite number >= 0, got {r.temperature!r}"
        if r.top_k is not None and (isinstance(r.top_k, bool) or not isinstance(r.top_k, int) or r.top_k < 1):
            return f"top_k: expected None or an int >= 1, got {r.top_k!r}"
        if r.top_p is not None and (isinstance(r.top_p, bool) or not isinstance(r.top_p, (int, float))
                                    or not 0 < r.top_p <= 1):
            return f"top_p: expected None or a number in (0, 1], got {r.top_p!r}"
        if r.seed is not None and (isinstance(r.seed, bool) or not isinstance(r.seed, int)):
            return f"seed: expected None or an int, got {r.seed!r}"
        if r.eos_token_id is not None and (isinstance(r.eos_token_id, bool) or not isinstance(r.eos_token_id, int)):
            return f"eos_token_id: expected None or an int, got {r.eos_token_id!r}"
        return None

    # ------------------------------------------------------------------ the loop
    @property
    def idle(self) -> bool:
        return not (self.active or self.waiting or self._failed)

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One decode step for the running requests, then waiting requests admitted into
        free slots (one packed prefill, which yields their first tokens). Returns the
        tokens produced, in slot order."""
        events, self._failed = self._failed, []
        running = list(self.active)
        if running:
            tokens = self._sample(running, self._decode(len(running)))
            self.tokens[: len(tokens)].copy_(torch.tensor(tokens), non_blocking=True)
            for state, token in zip(running, tokens):
                state.length += 1  # the decode step appended the previous token to the cache
                events.append(self._emit(state, token))
            self._retire()  # free their slots for this step's arrivals
        joining, tokens = [], 0
        while self.waiting and len(self.active) + len(joining) < self.max_batch:
            length = len(self.waiting[0][2])
            if joining and tokens + length > self.max_prefill_tokens:
                break
            joining.append(self.waiting.popleft())
            tokens += length
        if joining:
            events += self._admit(joining)
        self._retire()
        return events

    def stream(self, requests: Iterable[Request] = ()) -> Iterator[TokenEvent]:
        """Submit ``requests`` and yield tokens as they are produced until every
        request (these and any submitted meanwhile) is done."""
        for request in requests:
            self.submit(request)
        while not self.idle:
            yield from self.step()

    def run(self, requests: Sequence[Request]) -> list[Completion]:
        """Serve ``requests`` to completion; one :class:`Completion` per request, in order."""
        ids = [self.submit(r) for r in requests]
        tokens = {i: [] for i in ids}
        done: dict = {}
        while not self.idle:
            for event in self.step():
                if event.request_id not in tokens:
                    continue
                if event.token is not None:
                    tokens[event.request_id].append(event.token)
                if event.finished:
                    done[event.request_id] = (event.finish_reason, event.error)
        return [Completion(i, tokens[i], *done[i]) for i in ids]

    # ------------------------------------------------------------------ internals
    def _layer_choices(self, budget: float) -> list:
        if budget not in self._choices:
            self._choices[budget] = self.model.choices_for(budget)
        return self._choices[budget]

    def _slot_views(self, begin: int, end: int) -> list:
        return [KVCache(c.k[begin:end], c.v[begin:end], c.seqlens[begin:end]) for c in self.caches]

    def _admit(self, joining: list) -> list:
        """Prefill ``joining`` (``(request_id, request, prompt)`` each) packed into the next
        free slots; returns their first tokens."""
        first, count = len(self.active), len(joining)
        budgets = [float(request.budget) for _, request, _ in joining]
        choices = [tuple(self._layer_choices(budget)) for budget in budgets]
        table = torch.tensor(choices).permute(2, 1, 0)  # [2, L, count]: one copy to the device each
        self.widths[:, first:first + count] = table[0].to(self.device, self.widths.dtype)
        self.heads[:, first:first + count] = table[1].to(self.device, self.heads.dtype)
        self.budgets[first:first + count] = torch.tensor(budgets).to(self.device, self.budgets.dtype)
        lengths = [len(prompt) for _, _, prompt in joining]
        ends = list(itertools.accumulate(lengths))
        ids = torch.tensor([t for _, _, prompt in joining for t in prompt], dtype=torch.long, device=self.device)
        cu_seqlens = torch.tensor([0, *ends], dtype=torch.int32, device=self.device)
        caches = self._slot_views(first, first + count)
        if self.model.token_routers is not None:  # the routers choose per token, from the budget
            budget = budgets[0] if len(set(budgets)) == 1 else torch.tensor(budgets, device=self.device)
            logits = self.model(ids, budget=budget, cu_seqlens=cu_seqlens, caches=caches)
        else:  # the choices the decode steps will use, so that a request's KV cap never changes
            per_layer = choices[0] if len(set(choices)) == 1 else [
                (self.widths[i, first:first + count], self.heads[i, first:first + count]) for i in range(len(self.caches))]
            logits = self.model(ids, cu_seqlens=cu_seqlens, caches=caches, choices=list(per_layer))
        states = []
        for (request_id, request, _), length, chosen in zip(joining, lengths, choices):
            generator = None
            if request.temperature > 0:
                generator = torch.Generator(device=self.device)
                if request.seed is not None:
                    generator.manual_seed(request.seed)
                else:
                    generator.seed()
            states.append(_Active(request_id, request, chosen, length, [], generator))
        self.active += states
        tokens = self._sample(states, logits[cu_seqlens[1:].long() - 1])
        self.tokens[first : first + len(tokens)].copy_(torch.tensor(tokens), non_blocking=True)
        return [self._emit(state, token) for state, token in zip(states, tokens)]

    @staticmethod
    def _sample(states: list, logits: torch.Tensor) -> list:
        """One token per request from ``logits [n, V]``: greedy rows with one argmax (one
        copy to the host for the batch), sampled rows each with its own generator."""
        from flextron_kernels.models.modeling import _sample

        tokens = logits.argmax(-1).tolist()
        for i, state in enumerate(states):
            r = state.request
            if r.temperature > 0:
                tokens[i] = int(_sample(logits[i : i + 1].float(), r.temperature, r.top_k, r.top_p, state.generator)[0])
        return tokens

    @staticmethod
    def _emit(state: _Active, token: int) -> TokenEvent:
        r = state.request
        state.generated.append(token)
        reason = None
        if r.eos_token_id is not None and token == r.eos_token_id:
            reason = "eos"
        elif len(state.generated) >= r.max_new_tokens:
            reason = "length"
        return TokenEvent(state.request_id, token, reason is not None, reason)

    def _retire(self) -> None:
        """Drop finished requests; the last active request moves into each freed slot."""
        slot = 0
        while slot < len(self.active):
            state = self.active[slot]
            r = state.request
            done = len(state.generated) >= r.max_new_tokens or (
                r.eos_token_id is not None and state.generated[-1] == r.eos_token_id
            )
            if not done:
                slot += 1
                continue
            last = len(self.active) - 1
            if slot != last:
                moved = self.active[last]
                for c in self.caches:
                    c.k[slot, :, : moved.length].copy_(c.k[last, :, : moved.length])
                    c.v[slot, :, : moved.length].copy_(c.v[last, :, : moved.length])
                    c.seqlens[slot] = c.seqlens[last]
                for buffer in (self.tokens, self.budgets):
                    buffer[slot] = buffer[last]
                self.widths[:, slot], self.heads[:, slot] = self.widths[:, last], self.heads[:, last]
                self.active[slot] = moved
            self.active.pop()

    def _decode_args(self, n: int, bucket: int):
        """The decode step's arguments for slots ``0..bucket-1`` (the first ``n`` active),
        and a key naming what a graph of them bakes in."""
        if self.model.token_routers is not None:  # routers choose per token inside the step
            return "routed", dict(budget=self.budgets[:bucket])
        choices = {s.choices for s in self.active[:n]}
        if len(choices) == 1:  # one set of static widths: the key is that set, not the budget
            chosen = choices.pop()
            return chosen, dict(choices=list(chosen))
        return "mixed", dict(choices=[(self.widths[i, :bucket], self.heads[i, :bucket]) for i in range(len(self.caches))])

    def _prepare_padding(self, n: int, bucket: int) -> None:
        """Slots ``n..bucket-1`` hold no request but run in the bucket's graph: a copy of
        slot 0's choices, and an empty cache (what they append is never read)."""
        if bucket == n:
            return
        self.budgets[n:bucket] = self.budgets[0]
        self.widths[:, n:bucket] = self.widths[:, :1]
        self.heads[:, n:bucket] = self.heads[:, :1]
        for c in self.caches:
            c.seqlens[n:bucket] = 0

    def _decode(self, n: int) -> torch.Tensor:
        """Logits ``[n, V]`` of one decode step over slots ``0..n-1``."""
        bucket = next(b for b in self.buckets if b >= n) if self.pad_to_buckets else n
        self._prepare_padding(n, bucket)
        key, kwargs = self._decode_args(n, bucket)
        graph = self._graphs.get((bucket, key)) if self.cuda_graphs else False
        if graph is None:
            logits = self._run_eager(bucket, kwargs)  # compiles and warms the kernels, and is this step
            self._prepare_padding(n, bucket)
            self._graphs[(bucket, key)] = graph = self._capture(bucket, kwargs)
            return logits[:n]
        if graph is False:  # no graphs, or a capture that failed: eager
            return self._run_eager(bucket, kwargs)[:n]
        cuda_graph, logits = graph
        cuda_graph.replay()
        return logits[:n]

    def _step(self, bucket: int, kwargs):
        """The decode step over slots ``0..bucket-1``, as a call (run eagerly, or captured)."""
        return lambda: self.model.decode_step(self.tokens[:bucket], self._slot_views(0, bucket), **kwargs)

    def _run_eager(self, bucket: int, kwargs) -> torch.Tensor:
        with skip_width_value_checks():  # the widths were checked when each request was admitted
            return self._step(bucket, kwargs)()

    def _capture(self, bucket: int, kwargs):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        captured = capture(self._step(bucket, kwargs), what=f"decode step for batch bucket {bucket}", pool=self._pool)
        return captured if captured is not None else False
