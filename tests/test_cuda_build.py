"""Compile-only check of the CUDA sources: each csrc/*.cu builds with nvcc for sm_90.

Runs wherever ``nvcc`` is on PATH (no GPU needed) and skips otherwise. It catches
CUDA compile errors in CI even when the installed extension was built without CUDA.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_cuda_sources_exist():
    assert CU_SOURCES, f"no .cu files in {CSRC}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_for_sm90(source: Path, tmp_path: Path):
    cmd = [
        NVCC,
        "-std=c++17",
        "-gencode",
        "arch=compute_90,code=sm_90",
        f"-I{CSRC}",
        "-c",
        str(source),
        "-o",
        str(tmp_path / (source.stem + ".o")),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
