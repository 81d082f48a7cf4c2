"""Training stages on a tiny model and a small slice of Python's standard library."""

import json
import math

import pytest
import torch

from flextron_kernels.bench.latency_table import LatencyTable
from flextron_kernels.models import FlextronConfig, FlextronForCausalLM
from flextron_kernels.training import (
    ByteTokenizer,
    ElasticConfig,
    JointConfig,
    PackedSequences,
    RouterConfig,
    elastic_train,
    find_files,
    joint_train,
    routed_cost_ratio,
    token_routed_cost_ratio,
    tokenize_files,
    train_routers,
)
from flextron_kernels.training.data import stdlib_sources

BUDGETS = [0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def data():
    stream = tokenize_files(stdlib_sources(60_000), ByteTokenizer())
    return PackedSequences(stream, 32).split(0.05)


def tiny_model(seed=0, layers=2):
    torch.manual_seed(seed)
    config = FlextronConfig(arch="gpt2", vocab_size=257, d_model=32, n_layers=layers, q_heads=4, kv_heads=4, ffn=64,
                            max_positions=64, tie_embeddings=True, mlp_choices=[[16, 32, 48, 64]] * layers,
                            head_choices=[[1, 2, 3, 4]] * layers)
    return FlextronForCausalLM(config)


def test_data_pipeline(tmp_path):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("defgh")
    files = find_files([tmp_path], "*.txt")
    stream = tokenize_files(files, tok)
    assert stream.tolist() == list(b"abc") + [256] + list(b"defgh") + [256]
    packed = PackedSequences(stream, 4)
    assert packed.rows.shape == (2, 5) and torch.equal(packed.rows[1, 0], stream[4])
    with pytest.raises(FileNotFoundError, match="data: no such file or folder"):
        find_files([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="data: the corpus is empty"):
        tokenize_files([tmp_path / "empty.txt"], tok)
    with pytest.raises(ValueError, match="cannot fill one sequence"):
        PackedSequences(stream, 100)


def test_elastic_training_lowers_every_budget_loss(data, tmp_path):
    train, val = data
    model = tiny_model()
    from flextron_kernels.training.common import evaluate

    before = {b: evaluate(model, val, b) for b in BUDGETS}
    records = elastic_train(model, train, val, ElasticConfig(steps=30, batch_size=8, lr=3e-3, log_every=29,
                                                             distill="full"), metrics_path=tmp_path / "m.jsonl",
                            progress=False)
    last = records[-1]["val_loss"]
    assert all({"1.0", "0.25"} <= set(r["loss_per_budget"]) for r in records)  # sandwich: full and smallest every step
    assert any("random" in r["loss_per_budget"] for r in records)  # per-layer random sub-networks too
    assert all(last[str(b)] < before[b] - 0.3 for b in BUDGETS), (before, last)
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == 30 and "tokens_per_s" in json.loads(lines[-1])


def test_elastic_training_under_bf16_autocast(data):
    train, _ = data
    model = tiny_model()
    seen = []
    model.layers[0].mlp.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = elastic_train(model, train, None, ElasticConfig(steps=2, batch_size=4, lr=3e-3, autocast="bfloat16"),
                            progress=False)
    assert seen and set(seen) == {torch.bfloat16}  # the forward passes ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 weights
    assert all(math.isfinite(v) for r in records for v in r["loss_per_budget"].values())
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="autocast: expected None or 'bfloat16' .*got 'float16'"):
        ElasticConfig(autocast="float16")


def test_resume_continues_the_same_run(data, tmp_path):
    train, _ = data
    config = ElasticConfig(steps=6, batch_size=4, lr=1e-3, seed=5)
    straight = tiny_model(1)
    full_run = elastic_train(straight, train, None, config, checkpoint=tmp_path / "a.pt", checkpoint_every=3,
                             progress=False)
    first = tiny_model(1)
    elastic_train(first, train, None, ElasticConfig(**{**config.__dict__, "steps": 3}), checkpoint=tmp_path / "b.pt",
                  checkpoint_every=3, progress=False)
    resumed = tiny_model(1)
    rest = elastic_train(resumed, train, None, config, checkpoint=tmp_path / "b.pt", resume=True, progress=False)
    assert [r["loss_per_budget"] for r in rest] == [r["loss_per_budget"] for r in full_run[3:]]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# Eight layers: with two, one step of one layer's choice moves the latency by 12.5%, more
# than the 5% a route is allowed to miss its budget by.
def test_router_training_meets_budgets(data):
    train, _ = data
    model = tiny_model(2, layers=8)
    result = train_routers(model, train, RouterConfig(steps=150, samples=16, surrogate_steps=150, batch_size=4),
                           progress=False)
    for budget in BUDGETS:
        assert abs(routed_cost_ratio(model, budget, result["costs"]) / budget - 1) <= 0.05, budget
    assert all(p.requires_grad for p in model.parameters())


def test_router_training_with_a_latency_table(data):
    train, _ = data
    model = tiny_model(3, layers=8)
    entries = [dict(kind="mlp", choice=c, phase="prefill", tokens=128, ms=0.01 + c / 1000) for c in (16, 32, 48, 64)]
    entries += [dict(kind="attention", choice=h, phase="prefill", tokens=128, ms=0.02 * h) for h in (1, 2, 3, 4)]
    table = LatencyTable(entries)
    result = train_routers(model, train, RouterConfig(steps=120, samples=12, surrogate_steps=100, batch_size=4, tokens=128),
                           latency_table=table, progress=False)
    for budget in (0.5, 1.0):
        assert abs(routed_cost_ratio(model, budget, result["costs"]) / budget - 1) <= 0.05, budget
    # Routes are nested: no layer's choice shrinks as the budget grows.
    with torch.no_grad():
        mlp_logits, head_logits = model.static_router(torch.tensor(BUDGETS))
    for logits in (mlp_logits, head_logits):
        assert (logits.argmax(-1).diff(dim=0) >= 0).all(), logits.argmax(-1)
    with pytest.warns(UserWarning, match=r"budgets \[0.1\] cannot be met: the smallest sub-network costs 0.299"):
        train_routers(tiny_model(3, layers=8), train, RouterConfig(steps=1, samples=2, surrogate_steps=1, batch_size=2,
                                                                  tokens=128, budgets=[0.1, 1.0]),
                      latency_table=table, progress=False)
    bad = LatencyTable([e for e in entries if e["choice"] != 48])
    with pytest.raises(ValueError, match="latency table: no prefill entries for mlp choices \\[48\\]"):
        train_routers(tiny_model(), train, RouterConfig(steps=1), latency_table=bad, progress=False)


def test_joint_fine_tuning_updates_model_and_routers(data):
    train, _ = data
    model = tiny_model(4)
    model.attach_routers(BUDGETS, static=True, token=True, hidden=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    joint_train(model, train, JointConfig(steps=3, batch_size=4, calibration_tokens=2048), progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("static_router") for n in changed)
    assert any(n.startswith("token_routers") for n in changed)
    assert any(n.startswith("layers.0.mlp") for n in changed)
    with pytest.raises(ValueError, match="joint_train: attach routers first"):
        joint_train(tiny_model(), train, JointConfig(steps=1), progress=False)


def test_route_projection_reaches_the_latency_band_above_a_floor():
    from flextron_kernels.training.routers import project_route

    layers = 6
    costs = (torch.tensor([[1.0, 2.0, 3.0, 4.0]] * layers, dtype=torch.float64),
             torch.tensor([[2.0, 4.0, 6.0, 8.0]] * layers, dtype=torch.float64))
    full = float(costs[0][:, -1].sum() + costs[1][:, -1].sum())  # 72

    def surrogate(features):  # predicted loss falls with every larger choice, more for heads
        mlp, heads = features[:, : layers * 4].reshape(-1, layers, 4), features[:, layers * 4:].reshape(-1, layers, 4)
        steps = torch.arange(4.0)
        return 3.0 - 0.01 * (mlp * steps).sum((1, 2)) - 0.02 * (heads * steps).sum((1, 2))

    top = torch.full((layers,), 3)
    route = project_route(top, top, costs, 0.5 * full, 0.02, surrogate)
    cost = float(costs[0].gather(1, route[0][:, None]).sum() + costs[1].gather(1, route[1][:, None]).sum())
    assert abs(cost / (0.5 * full) - 1) <= 0.02, cost
    floor = [torch.full((layers,), 2), torch.full((layers,), 1)]
    bottom = torch.zeros(layers, dtype=torch.long)
    above = project_route(bottom, bottom, costs, 0.75 * full, 0.02, surrogate, floor=floor)
    assert all((r >= f).all() for r, f in zip(above, floor))


def test_joint_training_calibrates_token_routers_to_their_budgets_on_held_out_data(data):
    train, val = data
    model = tiny_model(8, layers=4)
    budgets = [0.5, 0.75, 1.0]
    result = train_routers(model, train, RouterConfig(steps=40, samples=8, surrogate_steps=50, batch_size=4,
                                                      budgets=budgets), progress=False)
    model.attach_routers(budgets, static=False, token=True, hidden=16)
    records = joint_train(model, train, JointConfig(steps=10, batch_size=4, budgets=budgets), progress=False)
    assert "calibration" in records[-1]
    for budget in budgets:
        ratio = token_routed_cost_ratio(model, val, budget, result["costs"], batches=4, batch_size=8)
        assert abs(ratio / budget - 1) <= 0.05, (budget, ratio)


def test_bad_budgets():
    for bad in ([0.0, 1.0], [1.5], []):
        with pytest.raises(ValueError, match="budgets: expected values in \\(0, 1\\]"):
            ElasticConfig(budgets=bad)
    with pytest.raises(ValueError, match="budgets: expected values in \\(0, 1\\]"):
        RouterConfig(budgets=[2.0])


def test_train_command_runs_the_three_stages(tmp_path):
    from flextron_kernels.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in stdlib_sources(30_000):
        (corpus / f.name).write_text(f.read_text())
    tiny_model(0).save_pretrained(tmp_path / "start")
    common = ["--data", str(corpus), "--seq-len", "32", "--batch-size", "4", "--steps", "3"]
    assert main(["train", "elastic", "--model", str(tmp_path / "start"), "--out", str(tmp_path / "s1")] + common) == 0
    assert main(["train", "routers", "--model", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"), "--device", "cpu"]
                + common) == 0
    assert main(["train", "joint", "--model", str(tmp_path / "s2"), "--out", str(tmp_path / "s3")] + common) == 0
    final = FlextronForCausalLM.from_pretrained(tmp_path / "s3")
    assert final.static_router is not None
    assert (tmp_path / "s1" / "metrics_elastic.jsonl").exists() and (tmp_path / "s1" / "trainer.pt").exists()


@pytest.mark.parametrize("argv,message", [
    (["--data", "/nonexistent/corpus"], "data: no such file or folder"),
    (["--budgets", "0.5,1.2"], "--budgets: expected values in \\(0, 1\\]"),
    (["--model", "/nonexistent/model"], "--model: no such folder"),
    (["--device", "nonsense"], "--device: expected a torch device such as cuda, cuda:1 or cpu, got 'nonsense'"),
] + ([] if torch.cuda.is_available() else [
    (["--device", "cuda"], "--device: 'cuda' asks for a GPU, and this machine has none"),
]))
def test_train_command_bad_input(tmp_path, argv, message, capsys):
    from flextron_kernels.cli import main

    (tmp_path / "a.py").write_text("x = 1\n" * 400)
    tiny_model(0).save_pretrained(tmp_path / "m")
    base = {"--data": str(tmp_path / "a.py"), "--model": str(tmp_path / "m"), "--out": str(tmp_path / "o"), "--seq-len": "16"}
    for key, value in zip(argv[::2], argv[1::2]):
        base[key] = value
    args = ["train", "elastic"] + [x for kv in base.items() for x in kv]
    with pytest.raises(SystemExit) as exc:
        main(args)
    text = str(exc.value.code) + capsys.readouterr().err
    assert __import__("re").search(message, text), text


def test_train_command_rejects_a_mismatched_latency_table(tmp_path):
    from flextron_kernels.cli import main

    (tmp_path / "a.py").write_text("x = 1\n" * 400)
    tiny_model(0).save_pretrained(tmp_path / "m")
    LatencyTable([dict(kind="mlp", choice=99, phase="prefill", tokens=1, ms=1.0),
                  dict(kind="attention", choice=1, phase="prefill", tokens=1, ms=1.0)]).save(tmp_path / "lut.json")
    with pytest.raises(SystemExit, match="--lut: latency table: no prefill entries for mlp choices"):
        main(["train", "routers", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "a.py"), "--seq-len", "16",
              "--out", str(tmp_path / "o"), "--lut", str(tmp_path / "lut.json")])


def test_router_and_joint_stages_resume_exactly(data, tmp_path):
    train, _ = data
    config = RouterConfig(steps=8, samples=6, surrogate_steps=20, batch_size=2, check_every=3, surrogate_threshold=0.0)

    def routers(steps, resume=False, name="r.pt", model=None):
        model = model or tiny_model(6, layers=3)
        cfg = RouterConfig(**{**config.__dict__, "steps": steps})
        out = train_routers(model, train, cfg, checkpoint=tmp_path / name, checkpoint_every=2, resume=resume, progress=False)
        return model, out["records"]

    straight, straight_records = routers(8, name="a.pt")
    first, _ = routers(4, name="b.pt")
    resumed = tiny_model(6, layers=3)
    resumed.attach_routers(BUDGETS)
    resumed, rest = routers(8, resume=True, name="b.pt", model=resumed)
    steps = lambda records: [r["loss"] for r in records if "step" in r]  # noqa: E731
    assert steps(rest) == steps(straight_records)[4:]
    for a, b in zip(straight.static_router.parameters(), resumed.static_router.parameters()):
        assert torch.equal(a, b)

    def joint(model, steps, resume=False, name="j.pt"):
        return joint_train(model, train, JointConfig(steps=steps, batch_size=2, calibration_tokens=0),
                           checkpoint=tmp_path / name,
                           checkpoint_every=2, resume=resume, progress=False)

    m1 = tiny_model(7)
    m1.attach_routers(BUDGETS, static=True, token=True, hidden=8)
    full = joint(m1, 4, name="c.pt")
    m2 = tiny_model(7)
    m2.attach_routers(BUDGETS, static=True, token=True, hidden=8)
    joint(m2, 2, name="d.pt")
    m3 = tiny_model(7)
    m3.attach_routers(BUDGETS, static=True, token=True, hidden=8)
    rest = joint(m3, 4, resume=True, name="d.pt")
    assert steps(rest) == steps(full)[2:]
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


def test_elastic_training_brings_the_half_budget_close_to_the_full_model(data):
    """The example's first claim at CPU-test scale: a pretrained dense model, converted and
    sliced, is much worse at 50% than at full width; elastic training closes most of that gap."""
    transformers = pytest.importorskip("transformers")
    from flextron_kernels.training.common import evaluate, lm_loss

    train, val = data
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=257, n_embd=64, n_layer=2, n_head=4,
                                                             n_positions=64, bos_token_id=256, eos_token_id=256))
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        rows = train.batch(16, gen)
        loss = lm_loss(hf(input_ids=rows[:, :-1]).logits, rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = FlextronForCausalLM.from_hf(hf.eval(), calibration=train.rows[:32, :-1],
                                        mlp_choices=[[64, 128, 192, 256]] * 2, head_choices=[[1, 2, 3, 4]] * 2)
    gap_before = evaluate(model, val, 0.5, batches=8) - evaluate(model, val, 1.0, batches=8)
    elastic_train(model, train, None, ElasticConfig(steps=80, batch_size=16, lr=2e-3, distill="full"), progress=False)
    gap_after = evaluate(model, val, 0.5, batches=8) - evaluate(model, val, 1.0, batches=8)
    assert gap_before > 0.05 and gap_after < gap_before / 2, (gap_before, gap_after)


def test_autocast_is_for_the_elastic_stage_only(tmp_path):
    from flextron_kernels.cli import main

    with pytest.raises(SystemExit, match="--autocast: the elastic stage takes it; train routers runs in the weights"):
        main(["train", "routers", "--model", str(tmp_path / "m"), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
              "--autocast", "bfloat16"])
