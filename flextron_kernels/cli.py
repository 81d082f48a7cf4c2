"""The ``flextron`` command. ``flextron bench``: latency-per-budget curves, tables and plots."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def _budgets(text: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--budgets: expected values in (0, 1], got {text!r}")
    return sorted(set(values))


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {text!r}")
        return value

    return parse


def bench_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from flextron_kernels.bench.harness import MODELS

    p = parser or argparse.ArgumentParser(prog="flextron bench")
    p.description = "Latency per budget of the elastic ops, a layer and a model, beside same-run baselines."
    p.add_argument("--model", default=None,
                   help=f"one of {', '.join(MODELS)} or a JSON file of shapes (default: llama2-7b on a GPU, tiny on a CPU)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--budgets", type=_budgets, default=[0.25, 0.5, 0.75, 1.0], help="comma-separated, in (0, 1]")
    p.add_argument("--tokens", type=_positive("--tokens"), default=None, help="tokens per prefill call")
    p.add_argument("--batch", type=_positive("--batch"), default=None, help="sequences (prefill) and requests (decode)")
    p.add_argument("--phase", choices=("prefill", "decode", "both"), default="both")
    p.add_argument("--layers", type=_positive("--layers"), default=None, help="model layers to time (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and layers")
    p.add_argument("--out", default="flextron-bench", help="output folder (results.json, results.csv, plot.png)")
    p.add_argument("--lut", default=None, help="also write the latency lookup table (JSON) here")
    return p


def _resolve_model(name: str | None, on_gpu: bool):
    from flextron_kernels.bench.harness import MODELS

    if name is None:
        name = "llama2-7b" if on_gpu else "tiny"
    if name in MODELS:
        return name, dict(MODELS[name])
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        shapes = json.loads(path.read_text())
        required = set(MODELS["tiny"])
        if not required <= set(shapes):
            raise SystemExit(f"--model: {path} lacks {sorted(required - set(shapes))}")
        return path.stem, {k: shapes[k] for k in required}
    raise SystemExit(f"--model: expected one of {', '.join(MODELS)} or a JSON file of shapes, got {name!r}")


def _writable_folder(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A file of this process's own: under torchrun every rank checks the same folder.
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise SystemExit(f"--out: cannot write to {str(out)!r} ({err.strerror or err})") from None
    return out


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from flextron_kernels.bench.harness import BenchSettings, Harness
    from flextron_kernels.bench.measure import format_table
    from flextron_kernels.bench.report import HARNESS_COLUMNS

    on_gpu = torch.cuda.is_available()
    model_name, shapes = _resolve_model(args.model, on_gpu)
    out = _writable_folder(args.out)
    if args.lut:
        _writable_folder(str(Path(args.lut).parent or "."))
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    if on_gpu:
        tokens, batch, layers = args.tokens or (2048 if args.quick else 4096), args.batch or 8, args.layers or (4 if args.quick else None)
        lut_tokens = (1, 16, 512, 4096)
    else:
        tokens, batch, layers = args.tokens or 128, args.batch or 4, args.layers or (1 if args.quick else None)
        lut_tokens = (1, 16, 128)
    phases = ("prefill", "decode") if args.phase == "both" else (args.phase,)
    settings = BenchSettings(model=shapes, model_name=model_name, device=device, dtype=dtype, budgets=args.budgets,
                             tokens=tokens, batch=batch, phases=phases, layers=layers, lut_tokens=lut_tokens)
    harness = Harness(settings)

    def save(results):
        # Written aside, then renamed: a run stopped mid-write keeps the previous file whole.
        for name, write in (("results.json", lambda path: path.write_text(json.dumps(results, indent=2) + "\n")),
                            ("results.csv", lambda path: _write_csv(path, results["rows"]))):
            partial = out / f".{name}.partial"
            write(partial)
            os.replace(partial, out / name)

    results = harness.run(on_row=save)
    save(results)
    plotted = _plot(out / "plot.png", results)
    print(f"device: {results['environment']['device']}, model: {model_name}, dtype: {settings_dtype(dtype)}, "
          f"copy {results['ceilings']['copy_tbps']:.2f} TB/s, matmul {results['ceilings']['matmul_tflops']:.1f} TFLOP/s")
    print(format_table(results["rows"], HARNESS_COLUMNS))
    if args.lut:
        path = harness.latency_table().save(args.lut)
        print(f"wrote {path}")
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'}" + (f", {out / 'plot.png'}" if plotted else " (no plot: matplotlib missing)"))
    return 0


def settings_dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _write_csv(path: Path, rows: list) -> None:
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("op", "budget", "ms"), k))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, results: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["rows"]
    ops = [op for op in ("linear", "mlp", "attention", "layer", "prefill", "decode") if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in rows if r["op"] == op]
        budgets = [r["budget"] for r in mine]
        ax.plot(budgets, [r["ms"] for r in mine], "o-", label="flextron_kernels")
        if any(r.get("graph_ms") for r in mine):
            ax.plot(budgets, [r.get("graph_ms") for r in mine], "o-", label="flextron_kernels, CUDA graph")
        if any(r["baseline_ms"] for r in mine):
            label = next(r["baseline"] for r in mine if r["baseline_ms"])
            ax.plot(budgets, [r["baseline_ms"] for r in mine], "s--", label=label)
            if any(r.get("baseline_graph_ms") for r in mine):
                ax.plot(budgets, [r.get("baseline_graph_ms") for r in mine], "s:", label=f"{label}, CUDA graph")
        if any(r["ideal_ms"] for r in mine):
            ax.plot(budgets, [r["ideal_ms"] for r in mine], ":", color="gray", label="FLOP-proportional ideal")
        if op == "mlp":
            for r in rows:
                if r["op"] == "mlp_mixed":
                    ax.plot([r["budget"]], [r["ms"]], "D", label="per-token mix (ours)")
                    ax.plot([r["budget"]], [r["baseline_ms"]], "x", label="per-token mix (bucketed loop)")
        ax.set_title(op)
        ax.set_xlabel("budget")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    env = results["environment"]
    fig.suptitle(f"{results['settings']['model']} ({results['settings']['dtype']}) on {env['device']}, torch {env['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def train_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = ("Train a Flextron model: 'elastic' (stage 1), 'routers' (stage 2, surrogate + latency "
                     "table), 'joint' (stage 3). Reads and writes Flextron checkpoints (save_pretrained folders).")
    p.add_argument("stage", choices=("elastic", "routers", "joint"))
    p.add_argument("--model", required=True, help="a Flextron checkpoint folder, or a local Hugging Face model to convert")
    p.add_argument("--data", nargs="+", required=True, help="text files or folders")
    p.add_argument("--pattern", default="*", help="file pattern inside folders (e.g. '*.py')")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer path")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--steps", type=_positive("--steps"), default=100)
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=8)
    p.add_argument("--seq-len", type=_positive("--seq-len"), default=128)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--budgets", type=_budgets, default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--lut", default=None, help="latency table from 'flextron bench --lut' (routers, joint)")
    p.add_argument("--distill", choices=("none", "full"), default="none")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/trainer.pt")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autocast", choices=("bfloat16",), default=None,
                   help="elastic stage: forward passes in bf16 under torch.autocast (fp32 weights and optimizer)")
    p.add_argument("--device", default=None,
                   help="where to train, e.g. cuda, cuda:1 or cpu (default: a GPU if there is one; under torchrun, "
                        "each process's local GPU). The weights stay fp32.")
    return p


def _train_device(name):
    """``--device`` as a torch device (default: a GPU if there is one), or SystemExit."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device: expected a torch device such as cuda, cuda:1 or cpu, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device: {name!r} asks for a GPU, and this machine has none (torch sees no CUDA device)")
    return device


def run_train(args: argparse.Namespace) -> int:
    import torch

    from flextron_kernels.models import FlextronForCausalLM
    from flextron_kernels.training import (
        ElasticConfig,
        JointConfig,
        PackedSequences,
        RouterConfig,
        elastic_train,
        find_files,
        joint_train,
        load_tokenizer,
        tokenize_files,
        train_routers,
    )

    # Every input is checked before any training starts.
    if args.autocast and args.stage != "elastic":
        raise SystemExit(f"--autocast: the elastic stage takes it; train {args.stage} runs in the weights' dtype")
    try:
        files = find_files(args.data, args.pattern)
        stream = tokenize_files(files, load_tokenizer(args.tokenizer))
        train, val = PackedSequences(stream, args.seq_len).split(0.05)
    except (OSError, ValueError) as err:
        raise SystemExit(str(err)) from None
    out = _writable_folder(args.out)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Under torchrun each process takes its local GPU (_distribute); alone, the chosen device.
    device = None if distributed and args.device is None else _train_device(args.device)
    model_path = Path(args.model)
    config_file = model_path / "config.json"
    if config_file.exists() and "flextron_config" in json.loads(config_file.read_text()):
        model = FlextronForCausalLM.from_pretrained(model_path, device=device)
    elif model_path.exists():  # a Hugging Face checkpoint: convert, ranked on the first training rows
        model = FlextronForCausalLM.from_hf(model_path, calibration=train.rows[:16, :-1], device=device)
    else:
        raise SystemExit(f"--model: no such folder: {str(model_path)!r}")
    if args.lut:
        from flextron_kernels.bench.latency_table import LatencyTable
        from flextron_kernels.training.routers import check_table

        try:
            check_table(model, LatencyTable.load(args.lut), "prefill")
        except (OSError, ValueError) as err:
            raise SystemExit(f"--lut: {err}") from None
    metrics = out / f"metrics_{args.stage}.jsonl"
    torch.manual_seed(args.seed)
    trained = model
    if distributed:  # started by torchrun
        trained = _distribute(model, args.fsdp)
        if args.stage != "elastic":
            raise SystemExit(f"train {args.stage}: run it in one process (only the elastic stage is distributed)")
    if args.stage == "elastic":
        config = ElasticConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 3e-4, budgets=args.budgets,
                               autocast=args.autocast,
                               distill=args.distill, seed=args.seed)
        rank0 = int(os.environ.get("RANK", "0")) == 0
        elastic_train(trained, train, val, config, metrics_path=metrics if rank0 else None,
                      checkpoint=out / "trainer.pt", checkpoint_every=max(args.steps // 10, 1), resume=args.resume,
                      progress=rank0)
    elif args.stage == "routers":
        config = RouterConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 1e-2, budgets=args.budgets,
                              tokens=args.batch_size * args.seq_len, seed=args.seed)
        train_routers(model, train, config, latency_table=args.lut, metrics_path=metrics, checkpoint=out / "trainer.pt",
                      checkpoint_every=max(args.steps // 10, 1), resume=args.resume)
    else:
        config = JointConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 1e-4, budgets=args.budgets,
                             tokens=args.batch_size * args.seq_len, seed=args.seed)
        joint_train(model, train, config, latency_table=args.lut, metrics_path=metrics, checkpoint=out / "trainer.pt",
                    checkpoint_every=max(args.steps // 10, 1), resume=args.resume)
    # FSDP2 shards parameters as DTensors: gather full ones (a collective: every rank).
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    if int(os.environ.get("RANK", "0")) == 0:
        model.save_pretrained(out, state_dict=state)
        print(f"wrote {out} (metrics: {metrics})")
    return 0


def _distribute(model, fsdp: bool):
    """Join the torchrun process group and wrap ``model`` in DDP or FSDP2."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        model.cuda(local)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model)



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flextron", description="flextron_kernels command line")
    sub = parser.add_subparsers(dest="command", required=True)
    bench_parser(sub.add_parser("bench", help="latency-per-budget benchmark (the main job)"))
    train_parser(sub.add_parser("train", help="elastic training, router training, joint fine-tuning"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_bench(args)
    return run_train(args)


def bench_main(argv=None) -> int:
    """``python -m flextron_kernels.bench``: ``flextron bench`` with the same options."""
    return run_bench(bench_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
