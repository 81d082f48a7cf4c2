"""Every Triton kernel compiles for sm_90 at every GPU tile configuration the package can
launch (the defaults, each tuned GPU's, the fp32 ones; no GPU needed: Triton's own ptxas
builds the cubin), within an H100/H200 block's shared memory, and the GEMM-shaped kernels
get pipelined asynchronous copies and tensor-core instructions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile_triton_kernels.py"


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900, env=env)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no kernel compiled:\n{result.stdout}\n{result.stderr[-4000:]}"
    return rows


def test_every_kernel_compiles_for_sm90(compiled):
    failures = [r for r in compiled if not r["ok"]]
    assert not failures, json.dumps(failures, indent=1)


def test_gemm_kernels_are_pipelined_on_tensor_cores(compiled):
    def name(r):  # without the "[tile variant] " prefix
        return r["kernel"].split("] ", 1)[-1]

    gemms = [r for r in compiled
             if name(r).startswith(("linear", "mlp", "weight grad", "attention")) and "delta" not in name(r)]
    assert len(gemms) > 40
    for r in gemms:
        assert r["tensor_core_ops"] > 0 or "ieee" in r["kernel"], r
        if "through TMA" in r["kernel"]:  # the weight, or the keys and values, as bulk copies
            assert r["tma_copies"] > 0, r
        # The routed matmul's gathered rows stay per-thread copies; so do all other operands.
        assert r["async_copies"] > 0 or "K and V through TMA" in r["kernel"], r
    assert sum("through TMA" in r["kernel"] for r in gemms) > 10


def test_attention_kernels_do_not_spill_registers_at_16_bit(compiled):
    # Spilled registers go through local memory in every loop step. The dk/dv kernel
    # spilled at every tile size before its loops over heads and query blocks became one.
    attention = [r for r in compiled if " attention " in f" {r['kernel']} " and "bf16" in r["kernel"]]
    assert len(attention) >= 6
    if any(r["spill_bytes"] is None for r in attention):
        # Registers are read with the cuobjdump that Triton bundles (from Triton 3.4 on); the
        # package supports older Tritons, whose builds this check cannot read.
        pytest.skip("Triton's bundled cuobjdump is missing: registers and spills cannot be read")
    assert all(r["spill_bytes"] == 0 for r in attention), [(r["kernel"], r["spill_bytes"]) for r in attention]
