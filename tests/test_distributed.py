"""Elastic training under torch.distributed on the CPU (2 processes, gloo): DDP and FSDP2."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))


def _worker(rank, world, store_file, wrapper, result_file):
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        from test_training import tiny_model  # noqa: E402

        from flextron_kernels.training import ByteTokenizer, ElasticConfig, PackedSequences, elastic_train
        from flextron_kernels.training.data import stdlib_sources, tokenize_files

        train = PackedSequences(tokenize_files(stdlib_sources(20_000), ByteTokenizer()), 16)
        model = tiny_model(0)
        if wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        records = elastic_train(wrapped, train, None, ElasticConfig(steps=3, batch_size=2, lr=1e-3), progress=False)
        if wrapper == "fsdp2":
            state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        else:
            state = model.state_dict()
        torch.save({"state": state, "budgets": [list(r["loss_per_budget"]) for r in records]}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_ranks_agree_after_elastic_training(tmp_path, wrapper):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), wrapper, str(tmp_path / "result")), nprocs=world, join=True)
    results = [torch.load(f"{tmp_path / 'result'}.{r}", weights_only=False) for r in range(world)]
    assert results[0]["budgets"] == results[1]["budgets"]  # identical sub-network sampling on every rank
    for name, value in results[0]["state"].items():
        torch.testing.assert_close(value, results[1]["state"][name], msg=name)
    # Different batches per rank, averaged gradients: the weights moved from initialisation.
    from test_training import tiny_model

    start = tiny_model(0).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in results[0]["state"].items())


@pytest.mark.parametrize("fsdp", [False, True])
def test_train_command_under_torchrun(tmp_path, fsdp):
    import subprocess

    from test_training import tiny_model

    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n" * 300)
    tiny_model(0).save_pretrained(tmp_path / "m")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flextron_kernels.cli", "train", "elastic", "--model", str(tmp_path / "m"), "--data",
           str(tmp_path / "a.py"), "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--out", str(tmp_path / "o")]
    if fsdp:
        cmd.append("--fsdp")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from flextron_kernels.models import FlextronForCausalLM

    trained = FlextronForCausalLM.from_pretrained(tmp_path / "o")
    start = tiny_model(0)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
