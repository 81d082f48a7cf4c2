"""Compile every Triton kernel for sm_90 (Hopper) without a GPU, at every tile configuration
the ops can launch on a GPU (the defaults and each tuned GPU's, from
:mod:`flextron_kernels.ops.tiles`), and report shared memory, registers and spills.

Triton's own ptxas builds the cubin, so this runs on any machine with triton installed.
It catches compile errors, and shared memory beyond what an H100/H200 block may use,
before a GPU run, and reports whether the GEMM loops got asynchronous (pipelined) copies
(per thread, ``async_copies``, or TMA bulk copies, ``tma_copies``) and tensor-core instructions, and, from the machine code (Triton's own cuobjdump),
registers per thread and register spills (``spill_bytes``: the stack frame they use,
``spill_instructions``: local loads and stores). Usage: ``TRITON_INTERPRET=0 python scripts/compile_triton_kernels.py``
(prints one JSON object per kernel configuration; exit status 1 if any failed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flextron_kernels.ops import tiles  # noqa: E402
from flextron_kernels.triton import (  # noqa: E402
    attention,
    attention_decode,
    mlp_activation_grad,
    prefix_weight_grad,
    routed_matmul,
)

HOPPER = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes a block may use on sm_90

DATA = {"a_ptr", "b_ptr", "b2_ptr", "bias_ptr", "c_ptr", "pre_ptr", "pre2_ptr", "dy_ptr", "x_ptr", "grad_weight_ptr",
        "grad_bias_ptr", "grad_h_ptr", "up_ptr", "gate_ptr", "q_ptr", "k_ptr", "v_ptr", "out_ptr", "dout_ptr", "dq_ptr",
        "dk_ptr", "dv_ptr"}
INDEX = {"sorted_token_idx_ptr", "group_offsets_ptr",
         "boundaries_ptr", "cu_seqlens_ptr", "seqlens_ptr", "seq_heads_ptr"}
WIDTHS = {"out_widths_ptr", "red_widths_ptr", "in_widths_ptr", "widths_ptr", "heads_ptr"}
FLOAT_ARGS = {"softmax_scale", "qk_scale"}


def descriptor_block(name: str, constexprs: dict):
    """The block shape of a TMA descriptor argument (None for other arguments): the routed
    matmul's B operands with B_TMA, the keys and values of the attention forward and dq
    kernels with KV_TMA."""
    if constexprs.get("B_TMA") and name in ("b_ptr", "b2_ptr"):
        tile = [constexprs["BLOCK_N"], constexprs["BLOCK_K"]]
        return tile[::-1] if constexprs["B_TRANSPOSED"] else tile
    if constexprs.get("KV_TMA") and name in ("k_ptr", "v_ptr"):
        return [constexprs["BLOCK_N"], constexprs["BLOCK_D"]]
    return None
LIMITS = {"out_size", "out_limit", "red_limit", "in_limit", "width_limit"}


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif descriptor_block(name, constexprs):
            block = descriptor_block(name, constexprs)
            sig[name] = f"tensordesc<{dtype}[{block[0]}, {block[1]}]>"
        elif name in DATA:
            sig[name] = "*" + dtype
        elif name in INDEX:
            sig[name] = "*i32"
        elif name in WIDTHS:
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"  # lse, delta, row scale, dscale, partial outputs
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(label, fn, dtype, constexprs, options):
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
    # Pointers, strides and sizes divisible by 16, as Triton specialises them at launch for
    # the usual shapes (a mask against such a size keeps loads vectorised).
    sig = signature(fn, dtype, constexprs)
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n.startswith("stride") or n in LIMITS]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned if sig[n] not in ("constexpr",)
             and not sig[n].startswith("tensordesc")}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    try:
        kernel = triton.compile(src, target=HOPPER, options=options)
    except Exception as err:  # report every failure, not only the first
        return dict(kernel=label, ok=False, error=f"{type(err).__name__}: {str(err)[:2000]}")
    ptx = kernel.asm["ptx"]
    shared = kernel.metadata.shared
    return dict(kernel=label, ok=shared <= MAX_SHARED, shared=shared, **machine_code(kernel.asm["cubin"]),
                async_copies=len(re.findall(r"cp\.async\.c", ptx)),
                tma_copies=ptx.count("cp.async.bulk.tensor"),
                tensor_core_ops=ptx.count("wgmma.mma_async") + ptx.count("mma.sync"),
                error=None if shared <= MAX_SHARED else f"shared memory {shared} > {MAX_SHARED}")


def machine_code(cubin: bytes) -> dict:
    """Registers per thread and register spills of a compiled kernel (None where the
    disassembler is missing)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:  # Triton's own cuobjdump (its knobs module: Triton 3.4 and later)
            from triton import knobs

            tool = knobs.nvidia.cuobjdump.path
            usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        except Exception:  # no disassembler: registers and spills unknown
            return dict(regs=None, spill_bytes=None, spill_instructions=None)
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return dict(regs=int(found[1]) if found else None, spill_bytes=int(found[2]) if found else None,
                spill_instructions=len(re.findall(r"\b(LDL|STL)\b", sass)))


def _split(config: dict) -> tuple[dict, dict]:
    """A tile configuration as (constexprs, compile options)."""
    options = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    return {k: v for k, v in config.items() if k not in options}, options


def _with_and_without_tma(config: dict):
    """``(label suffix, config)`` for B through pointers and through TMA descriptors."""
    yield "", dict(config, B_TMA=False)
    yield ", B through TMA", dict(config, B_TMA=True)


def configurations():
    # Unit strides are what Triton specialises on at launch for contiguous tensors.
    rm = routed_matmul.routed_matmul_kernel
    flags = dict(stride_ar=1, stride_br=1, stride_b2r=1, stride_cj=1, ROUTED=True, HAS_OUT_WIDTHS=False,
                 HAS_RED_WIDTHS=False, HAS_BIAS=False, HAS_ROW_SCALE=False, GATED=False, ACTIVATION="none",
                 STORE_PRE=False, ACCUMULATE=False, INPUT_PRECISION="tf32", GROUP_M=8, B_TRANSPOSED=False)
    dgrad = {k: v for k, v in flags.items() if k not in ("stride_br", "stride_b2r")}
    dgrad.update(stride_bj=1, B_TRANSPOSED=True)
    # Every 16-bit tile configuration the package can launch (the defaults and each tuned
    # GPU's), with B through pointers and through TMA.
    for variant, config in [(f"{name}, {family}", config) for family in ("matmul", "matmul_small")
                            for name, config in tiles.sixteen_bit_variants(family).items()]:
        for how, config in _with_and_without_tma(config):
            tile, big = _split(config)
            yield f"[{variant}] linear fwd, per-token out widths{how}", rm, "bf16", dict(
                flags, **tile, HAS_OUT_WIDTHS=True, HAS_BIAS=True), big
            yield f"[{variant}] linear dgrad, per-token in+out widths{how}", rm, "bf16", dict(
                dgrad, **tile, HAS_OUT_WIDTHS=True, HAS_RED_WIDTHS=True), big
            yield f"[{variant}] mlp up+gelu_tanh, bias{how}", rm, "fp16", dict(
                flags, **tile, HAS_OUT_WIDTHS=True, HAS_BIAS=True, ACTIVATION="gelu_tanh"), big
            yield f"[{variant}] mlp down, scale + bias{how}", rm, "bf16", dict(
                flags, **tile, HAS_RED_WIDTHS=True, HAS_BIAS=True, HAS_ROW_SCALE=True), big
            yield f"[{variant}] mlp dx, accumulate{how}", rm, "bf16", dict(
                dgrad, **tile, HAS_RED_WIDTHS=True, ACCUMULATE=True), big
    # The gated kernel takes the row tile of matmul (large batches) or matmul_small.
    row_tiles = {tiles.sixteen_bit_variants(f)["default"]["BLOCK_M"] for f in ("matmul", "matmul_small")}
    for variant, config in tiles.sixteen_bit_variants("matmul_gated").items():
        for how, config in _with_and_without_tma(config):
            tile, big = _split(config)
            for block_m in sorted(row_tiles):
                yield f"[{variant}] mlp gate+up+silu, saving pre-activations, {block_m} rows{how}", rm, "bf16", dict(
                    flags, BLOCK_M=block_m, **tile, HAS_OUT_WIDTHS=True, GATED=True, ACTIVATION="silu",
                    STORE_PRE=True), big
    for variant, config in tiles.sixteen_bit_variants("matmul_decode").items():
        for how, config in _with_and_without_tma(config):
            tile, small = _split(config)
            for block_m in (16, 64):
                yield f"[{variant}] mlp gate+up+silu, decode tile of {block_m}{how}", rm, "bf16", dict(
                    flags, **tile, BLOCK_M=block_m, ROUTED=False, HAS_OUT_WIDTHS=True, GATED=True,
                    ACTIVATION="silu"), small
                yield f"[{variant}] linear fwd, static, decode tile of {block_m}{how}", rm, "bf16", dict(
                    flags, **tile, BLOCK_M=block_m, ROUTED=False), small
                yield f"[{variant}] linear dgrad, per-token in+out widths, decode tile of {block_m}{how}", rm, \
                    "bf16", dict(dgrad, **tile, BLOCK_M=block_m, HAS_OUT_WIDTHS=True, HAS_RED_WIDTHS=True), small
    big = dict(num_warps=8, num_stages=3)
    yield "mlp gate+up fp32 tf32", rm, "fp32", dict(flags, HAS_OUT_WIDTHS=True, GATED=True, ACTIVATION="silu",
                                                   STORE_PRE=True, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32,
                                                   B_TMA=False), big
    yield "mlp gate+up fp32 ieee", rm, "fp32", dict(flags, HAS_OUT_WIDTHS=True, GATED=True, ACTIVATION="silu",
                                                   INPUT_PRECISION="ieee", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32,
                                                   B_TMA=False), \
        dict(num_warps=4, num_stages=2)

    wg = prefix_weight_grad.prefix_weight_grad_kernel
    wflags = dict(stride_dyj=1, stride_xc=1, stride_gwc=1, ROUTED=True, SORT_BY_OUT=True, HAS_OUT_WIDTHS=True,
                  HAS_IN_WIDTHS=False, HAS_BIAS=False, K_BLOCK_OFFSET=0, INPUT_PRECISION="tf32",
                  GROUPS_POW2=256)  # the default groups of a layer up to 16384 wide
    for variant, config in tiles.sixteen_bit_variants("weight_grad").items():
        tile, opts = _split(config)
        yield f"[{variant}] weight grad, bias column", wg, "bf16", dict(wflags, **tile, HAS_BIAS=True), opts
        yield f"[{variant}] weight grad, plain columns", wg, "bf16", dict(wflags, **tile, K_BLOCK_OFFSET=1), opts
        yield f"[{variant}] weight grad, sorted by in widths", wg, "bf16", dict(
            wflags, **tile, SORT_BY_OUT=False, HAS_OUT_WIDTHS=False, HAS_IN_WIDTHS=True), opts
        yield f"[{variant}] weight grad, static", wg, "bf16", dict(wflags, **tile, ROUTED=False, HAS_OUT_WIDTHS=False), opts

    ag = mlp_activation_grad.mlp_activation_grad_kernel
    for gated, act in ((True, "silu"), (True, "gelu"), (False, "gelu_tanh"), (False, "relu2")):
        yield f"activation grad {'gated ' if gated else ''}{act}", ag, "bf16", dict(
            stride_f=1, HAS_WIDTHS=True, HAS_SCALE=True, GATED=gated, ACTIVATION=act, BLOCK_M=8, BLOCK_F=256), dict(num_warps=4)

    att = dict(GROUP=4, HAS_HEADS=True, INPUT_PRECISION="tf32", HEAD_DIM=128, BLOCK_D=128)
    kernels = {"fwd": attention.attention_fwd_kernel, "bwd_dq": attention.attention_bwd_dq_kernel,
               "bwd_dkdv": attention.attention_bwd_dkdv_kernel}
    for kernel, fn in kernels.items():
        for head_dim in (64, 128, 256):
            wide = head_dim > 128
            if wide:
                variants = [("wide head", "bf16", "tf32", tiles.wide_head_tiles(kernel))]
            else:
                variants = [(variant, "bf16", "tf32", config)
                            for variant, config in tiles.sixteen_bit_variants(f"attention_{kernel}").items()]
            variants += [("fp32", "fp32", precision, tiles.attention_fp32_tiles(kernel, precision, wide_head=wide))
                         for precision in ("tf32", "ieee")]
            if kernel in ("fwd", "bwd_dq"):  # keys and values through pointers, and through TMA where launched
                variants = [(name, dtype, precision, dict(config, KV_TMA=False))
                            for name, dtype, precision, config in variants]
                variants += [(f"{name}, K and V through TMA", dtype, precision, dict(config, KV_TMA=True))
                             for name, dtype, precision, config in variants if dtype == "bf16" and not wide]
            for variant, dtype, precision, config in variants:
                # Causal, not causal, and (16-bit) causal with a sliding window.
                for causal, window in ((True, False), (False, False)) + (((True, True),) if dtype == "bf16" else ()):
                    if window and wide:
                        config = dict(tiles.wide_head_tiles(kernel, window=True), **{
                            k: v for k, v in config.items() if k == "KV_TMA"})
                    tile, opts = _split(config)
                    label = f"[{variant}] attention {kernel} {dtype} {precision}, head dim {head_dim}"
                    yield label + (", causal" if causal else "") + (", sliding window" if window else ""), fn, dtype, \
                        dict(att, **tile, HEAD_DIM=head_dim, BLOCK_D=head_dim, INPUT_PRECISION=precision,
                             CAUSAL=causal, WINDOW=window), opts
    yield "attention fwd, head dim 96, not causal", attention.attention_fwd_kernel, "bf16", dict(
        att, HEAD_DIM=96, CAUSAL=False, BLOCK_M=128, BLOCK_N=64, OVERLAP=True, KV_TMA=False, WINDOW=False), \
        dict(num_warps=8, num_stages=2)
    yield "attention bwd delta", attention.attention_bwd_delta_kernel, "bf16", dict(
        HEAD_DIM=128, BLOCK_D=128, BLOCK_T=64), dict(num_warps=4)

    dec = attention_decode.attention_decode_split_kernel
    for variant, config in tiles.sixteen_bit_variants("attention_decode").items():
        tile, opts = _split({k: v for k, v in config.items() if k != "PROGRAMS_PER_SM"})  # a launch-grid setting
        # Unit strides along the head dimension, as Triton specialises them at launch.
        yield f"[{variant}] decode split, GQA 4", dec, "bf16", dict(
            stride_qd=1, stride_kd=1, stride_vd=1, GROUP=4, HAS_HEADS=True, HEAD_DIM=128, INPUT_PRECISION="tf32",
            BLOCK_G=16, BLOCK_D=128, **tile), opts
    yield "decode combine", attention_decode.attention_decode_combine_kernel, "bf16", dict(
        stride_od=1, HAS_HEADS=True, HEAD_DIM=128, BLOCK_S=128, CHUNK_S=64, BLOCK_D=128), dict(num_warps=8)


def main() -> int:
    failed = 0
    for label, fn, dtype, constexprs, options in configurations():
        result = compile_one(label, fn, dtype, constexprs, options)
        failed += not result["ok"]
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
