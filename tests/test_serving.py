"""The serving loop: mixed budgets in one batch give each request's own tokens, requests
join and leave between steps, streaming, bad requests fail alone; CUDA graphs on a GPU."""

import warnings

import pytest
import torch

from flextron_kernels.models import FlextronConfig, FlextronForCausalLM
from flextron_kernels.serving import Completion, Request, Server

VOCAB = 97


def tiny_model(arch="llama", seed=0, device="cpu", dtype=torch.float32, routers=None):
    torch.manual_seed(seed)
    config = FlextronConfig(arch=arch, vocab_size=VOCAB, d_model=64, n_layers=2, q_heads=4,
                            kv_heads=2 if arch == "llama" else 4, ffn=128, max_positions=64,
                            tie_embeddings=arch == "gpt2")
    model = FlextronForCausalLM(config)
    with torch.no_grad():  # larger random weights than the default init: logits far from ties
        for p in model.parameters():
            p.normal_(0, 0.3)
    if routers == "static":
        model.attach_routers(static=True)
    elif routers == "token":
        model.attach_routers(static=False, token=True, hidden=16)
    return model.to(device, dtype).eval()


def alone(model, request, **kw):
    """The request served by itself (a batch of one)."""
    return Server(model, max_batch=1, max_len=48, **kw).run([request])[0].tokens


def requests(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    budgets = [0.25, 0.5, 0.75, 1.0]
    return [
        Request(torch.randint(0, VOCAB, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist(),
                budget=budgets[i % 4], max_new_tokens=int(torch.randint(1, 8, (1,), generator=gen)))
        for i in range(n)
    ]


@pytest.mark.parametrize("arch,routers", [("llama", None), ("gpt2", None), ("llama", "static"), ("llama", "token")])
def test_mixed_budget_batch_gives_each_requests_own_greedy_tokens(arch, routers):
    model = tiny_model(arch, routers=routers)
    batch = requests(7)
    # Three slots for seven requests: requests join as others leave.
    served = Server(model, max_batch=3, max_len=48).run(batch)
    for r, done in zip(batch, served):
        assert done.finish_reason == "length" and done.error is None
        assert len(done.tokens) == r.max_new_tokens
        assert done.tokens == alone(model, r), r


def test_prefill_token_limit_admits_fewer_per_step_and_changes_nothing():
    model = tiny_model()
    batch = requests(5, seed=6)
    server = Server(model, max_batch=4, max_prefill_tokens=1)  # one prompt per step
    for r in batch:
        server.submit(r)
    assert len(server.step()) == 1 and len(server.active) == 1
    rest = Server(model, max_batch=4).run(batch)
    limited = Server(model, max_batch=4, max_prefill_tokens=1).run(batch)
    assert [c.tokens for c in limited] == [c.tokens for c in rest]


def test_padding_to_buckets_changes_nothing():
    model = tiny_model()
    batch = requests(6, seed=5)
    plain = Server(model, max_batch=4).run(batch)
    padded = Server(model, max_batch=4, buckets=[4]).run(batch)
    assert [c.tokens for c in padded] == [c.tokens for c in plain]


def test_matches_model_generate():
    model = tiny_model()
    prompts = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    budgets = torch.tensor([0.25, 1.0, 0.5])
    expected = model.generate(prompts, budget=budgets, max_new_tokens=6)[:, 5:]
    served = Server(model, max_batch=4).run(
        [Request(p.tolist(), budget=float(b), max_new_tokens=6) for p, b in zip(prompts, budgets)])
    assert [c.tokens for c in served] == expected.tolist()


def test_generate_runs_a_static_router_once_and_checks_cuda_graph():
    model = tiny_model(routers="static")
    calls = []
    model.static_router.register_forward_hook(lambda *_: calls.append(1))
    prompts = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompts, budget=0.5, max_new_tokens=5)
    # The prefill's choice and the decode steps' (made once, not a host sync per step).
    assert len(calls) == 2
    with torch.no_grad():
        ids = prompts
        for _ in range(5):
            ids = torch.cat([ids, model(ids, budget=0.5)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs need input_ids and the model on a CUDA device"):
        model.generate(prompts, max_new_tokens=2, cuda_graph=True)


def test_stream_joins_between_steps_and_eos():
    model = tiny_model()
    server = Server(model, max_batch=2, max_len=32)
    first = Request([1, 2, 3], budget=0.5, max_new_tokens=5)
    eos = alone(model, first)[2]
    stopping = Request([1, 2, 3], budget=0.5, max_new_tokens=5, eos_token_id=eos)
    late = Request([7, 8], budget=1.0, max_new_tokens=3)
    a = server.submit(stopping)
    events = server.step()
    assert [(e.request_id, e.finished) for e in events] == [(a, False)]
    b = server.submit(late)  # joins while the first one runs
    got = {a: [], b: []}
    reasons = {}
    for event in list(events) + list(server.stream()):
        got[event.request_id].append(event.token)
        if event.finished:
            reasons[event.request_id] = event.finish_reason
    assert got[a] == alone(model, first)[: got[a].index(eos) + 1] and got[a][-1] == eos
    assert reasons == {a: "eos", b: "length"}
    assert got[b] == alone(model, late)
    assert server.idle and not server.active


def test_sampling_is_reproducible_per_request():
    model = tiny_model()
    r = Request([5, 6, 7], budget=0.75, max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.95, seed=123)
    other = Request([9], budget=0.25, max_new_tokens=4, temperature=1.0, seed=7)
    together = Server(model, max_batch=2).run([r, other])
    assert together[0].tokens == alone(model, r)
    assert together[1].tokens == alone(model, other)


def test_bad_requests_fail_alone():
    model = tiny_model()
    good = Request([1, 2], budget=0.5, max_new_tokens=3)
    bad = [
        Request([1, 2], budget=1.5),
        Request([1, 2], budget=0.0),
        Request(list(range(40)), budget=1.0, max_new_tokens=10),  # 50 > max_len 48
        Request([], budget=1.0),
        Request([1, VOCAB], budget=1.0),
        Request([1, 2], max_new_tokens=0),
        Request("hello"),
        Request([1, 2], temperature=None),
        Request([1, 2], temperature=1.0, top_k=0),
        Request([1, 2], temperature=1.0, top_p=-0.5),
        Request([1, 2], temperature=1.0, seed="x"),
    ]
    served = Server(model, max_batch=2, max_len=48).run([good, *bad, good])
    assert served[0].tokens == served[-1].tokens == alone(model, good)
    messages = [c.error for c in served[1:-1]]
    assert all(c.finish_reason == "error" and c.tokens == [] for c in served[1:-1])
    assert "budget: expected a float in (0, 1], got 1.5" in messages[0]
    assert "budget: expected a float in (0, 1], got 0.0" in messages[1]
    assert "prompt: 40 tokens + max_new_tokens=10 exceed the cache (max_len=48)" in messages[2]
    assert "prompt: expected a non-empty sequence" in messages[3]
    assert f"prompt: expected token ids in [0, {VOCAB})" in messages[4]
    assert "max_new_tokens: expected an int >= 1, got 0" in messages[5]
    assert "prompt: expected a sequence of int token ids" in messages[6]
    assert "temperature: expected a finite number >= 0, got None" in messages[7]
    assert "top_k: expected None or an int >= 1, got 0" in messages[8]
    assert "top_p: expected None or a number in (0, 1], got -0.5" in messages[9]
    assert "seed: expected None or an int, got 'x'" in messages[10]


def test_full_queue_rejects_the_extra_request_and_serves_the_rest():
    model = tiny_model()
    batch = requests(4, seed=3)
    served = Server(model, max_batch=2, max_queue=1).run(batch)
    # Submitted before any step: two take the free slots, one waits, the fourth finds no room.
    assert [c.finish_reason for c in served[:3]] == ["length"] * 3
    assert served[3].finish_reason == "error" and "server is full" in served[3].error
    assert "max_queue=1" in served[3].error
    for r, done in zip(batch[:3], served[:3]):
        assert done.tokens == alone(model, r)
    assert isinstance(served[0], Completion)
    # An idle server with no queue still takes as many requests as it has slots.
    assert [c.error for c in Server(model, max_batch=2, max_queue=0).run(batch[:2])] == [None, None]


def test_a_slot_freed_by_a_step_is_refilled_in_that_step():
    model = tiny_model()
    batch = [Request([1 + i, 2], budget=1.0, max_new_tokens=4) for i in range(8)]
    server = Server(model, max_batch=2)
    for r in batch:
        server.submit(r)
    steps = 0
    while not server.idle:
        server.step()
        steps += 1
        assert len(server.active) == 2 or not server.waiting
    assert steps == 13  # 4 rounds of 2 requests, each 4 tokens, the next pair joining as one leaves


def test_an_iterator_prompt_is_read_once():
    model = tiny_model()
    served = Server(model).run([Request(iter([7, 8, 9]), budget=0.5, max_new_tokens=3)])
    assert served[0].tokens == alone(model, Request([7, 8, 9], budget=0.5, max_new_tokens=3))


def test_bad_server_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_batch: expected an int >= 1, got 0"):
        Server(model, max_batch=0)
    with pytest.raises(ValueError, match="max_prefill_tokens: expected an int >= 1, got 0"):
        Server(model, max_prefill_tokens=0)
    with pytest.raises(ValueError, match="max_len: expected at most max_positions=64, got 100"):
        Server(tiny_model("gpt2"), max_len=100)
    with pytest.raises(ValueError, match="cuda_graphs: CUDA graphs need the model on a CUDA device"):
        Server(model, cuda_graphs=True)
    with pytest.raises(ValueError, match=r"buckets: expected sizes in \[1, 4\]"):
        Server(model, max_batch=4, buckets=[2, 8])


@pytest.mark.gpu
@pytest.mark.parametrize("routers", [None, "token"])
def test_cuda_graph_serving_equals_eager(routers):
    model = tiny_model(device="cuda", dtype=torch.bfloat16, routers=routers)
    batch = requests(9, seed=4)
    # The same padded batch sizes, so that both run the same kernels on the same shapes.
    eager = Server(model, max_batch=4, max_len=48, cuda_graphs=False, buckets=[1, 2, 4]).run(batch)
    graphed_server = Server(model, max_batch=4, max_len=48, cuda_graphs=True, buckets=[1, 2, 4])
    graphed = graphed_server.run(batch)
    assert [c.tokens for c in graphed] == [c.tokens for c in eager]
    kinds = {key for _, key in graphed_server._graphs}
    assert kinds & {"mixed", "routed"} and (routers or any(isinstance(k, tuple) for k in kinds)), kinds
    failed = [key for key, graph in graphed_server._graphs.items() if graph is False]
    assert not failed, f"decode steps that could not be captured: {failed}"


@pytest.mark.gpu
@pytest.mark.parametrize("routers", [None, "static", "token"])
@pytest.mark.parametrize("budget", [0.5, "mixed"])
def test_cuda_graph_generate_equals_eager(routers, budget):
    model = tiny_model(device="cuda", dtype=torch.bfloat16, routers=routers)
    prompts = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(6)).cuda()
    budget = torch.tensor([0.25, 1.0, 0.5], device="cuda") if budget == "mixed" else budget
    eager = model.generate(prompts, budget=budget, max_new_tokens=8, cuda_graph=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*CUDA graph capture failed")
        graphed = model.generate(prompts, budget=budget, max_new_tokens=8)
    assert torch.equal(graphed, eager)
