"""Tile configurations: defaults, the tuned table, overrides."""

import json

import pytest
import torch

from flextron_kernels.ops import tiles


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A tuned table in a temporary file and a device named 'Fake GPU'."""
    table = tmp_path / "tuned_tiles.json"
    monkeypatch.setattr(tiles, "TUNED_TABLE", table)
    monkeypatch.setattr(tiles, "_device_name", lambda index: "Fake GPU")
    tiles._tuned.cache_clear()
    yield table
    tiles._tuned.cache_clear()


def test_defaults_tuned_table_and_overrides(fake_gpu):
    device = torch.device("cuda", 0)
    assert tiles._sixteen_bit("matmul", device) == tiles._DEFAULTS_16BIT["matmul"]
    assert not tiles.has_tuned_tiles("matmul", device)
    fake_gpu.write_text(json.dumps({"devices": {"Fake GPU": {"matmul": {"BLOCK_N": 256, "num_stages": 4}},
                                                "Other GPU": {"matmul": {"BLOCK_N": 64}}}}))
    tiles._tuned.cache_clear()
    assert tiles.has_tuned_tiles("matmul", device) and not tiles.has_tuned_tiles("matmul_decode", device)
    assert not tiles.has_tuned_tiles("matmul", torch.device("cpu"))
    tuned = tiles._sixteen_bit("matmul", device)
    assert tuned["BLOCK_N"] == 256 and tuned["num_stages"] == 4 and tuned["BLOCK_K"] == 64
    with tiles.override_tiles(matmul=dict(BLOCK_N=64), attention_fwd=dict(num_warps=4)):
        assert tiles._sixteen_bit("matmul", device)["BLOCK_N"] == 64
        assert tiles._sixteen_bit("attention_fwd", device)["num_warps"] == 4
    assert tiles._sixteen_bit("matmul", device)["BLOCK_N"] == 256


def test_matmul_tiles_follow_the_row_count(fake_gpu):
    from types import SimpleNamespace

    t = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    defaults = tiles._DEFAULTS_16BIT
    assert tiles.matmul_config(t, 16)["BLOCK_N"] == defaults["matmul_decode"]["BLOCK_N"]
    for rows, family in ((65, "matmul_small"), (tiles.SMALL_ROWS, "matmul_small"), (tiles.SMALL_ROWS + 1, "matmul")):
        config = tiles.matmul_config(t, rows)
        assert {k: config[k] for k in defaults[family]} == defaults[family], rows
        gated = tiles.matmul_config(t, rows, gated=True)
        # The gated kernel takes the row tile of its row count's family.
        assert gated["BLOCK_M"] == config["BLOCK_M"] and gated["BLOCK_N"] == defaults["matmul_gated"]["BLOCK_N"], rows


def test_attention_tiles_follow_the_head_dim(fake_gpu):
    from types import SimpleNamespace

    def config(kernel, head_dim, dtype=torch.bfloat16):
        t = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(8, 4, head_dim))
        return tiles.attention_config(t, kernel)

    for kernel in tiles.ATTENTION_KERNELS:
        wide = tiles.WIDE_HEAD_TILES_16BIT[kernel]
        assert {k: config(kernel, 256)[k] for k in wide} == wide
        assert {k: config(kernel, 128)[k] for k in wide} == tiles._DEFAULTS_16BIT[f"attention_{kernel}"]
        for head_dim in (128, 256):
            fp32 = tiles.attention_fp32_tiles(kernel, "ieee", wide_head=head_dim > 128)
            assert config(kernel, head_dim, torch.float32) == dict(fp32, INPUT_PRECISION="ieee")
    with pytest.raises(ValueError, match="kernel: expected one of fwd, bwd_dq, bwd_dkdv, got 'bwd'"):
        config("bwd", 128)
    # A sliding window at head dim 256: the dq kernel's shorter key steps (no register spills).
    t = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(8, 4, 256))
    windowed = tiles.attention_config(t, "bwd_dq", window=True)
    assert windowed["BLOCK_N"] == 16 and windowed["BLOCK_M"] % 16 == 0
    assert tiles.attention_config(t, "fwd", window=True) == tiles.attention_config(t, "fwd")


def test_unreadable_table_gives_the_defaults(fake_gpu):
    fake_gpu.write_text("{not json")
    assert tiles._sixteen_bit("weight_grad", torch.device("cuda", 0)) == tiles._DEFAULTS_16BIT["weight_grad"]


def test_cpu_tiles_take_the_overrides_of_their_family():
    # The interpreter's tiles take the overrides of the family a GPU would use for the row
    # count (so that tests can run the kernels' options), the gated kernel's row tile aside.
    x = torch.empty(4, 8)
    with tiles.override_tiles(matmul=dict(BLOCK_M=128), matmul_decode=dict(B_TMA=True),
                              matmul_gated=dict(BLOCK_M=64, BLOCK_N=32), attention_fwd=dict(KV_TMA=True)):
        assert tiles.matmul_config(x, 4)["BLOCK_M"] == 16 and tiles.matmul_config(x, 4)["B_TMA"]
        assert tiles.matmul_config(x, tiles.SMALL_ROWS + 1)["BLOCK_M"] == 128
        gated = tiles.matmul_config(x, 100, gated=True)
        assert (gated["BLOCK_M"], gated["BLOCK_N"]) == (16, 32)
        q = torch.empty(4, 2, 16)
        assert tiles.attention_config(q, "fwd")["KV_TMA"] and not tiles.attention_config(q, "bwd_dq")["KV_TMA"]
    assert "B_TMA" not in tiles.matmul_config(x, 4) and not tiles.attention_config(q, "fwd")["KV_TMA"]


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="override_tiles: expected families among matmul, .*got \\['matmull'\\]"):
        with tiles.override_tiles(matmull={}):
            pass


def test_shipped_table_names_known_families_and_keys():
    # The table is package data: missing from an installed package, it would be a packaging bug.
    assert tiles.TUNED_TABLE.exists(), tiles.TUNED_TABLE
    table = json.loads(tiles.TUNED_TABLE.read_text())
    for device, families in table["devices"].items():
        for family, config in families.items():
            assert family in tiles.FAMILIES, (device, family)
            assert set(config) <= set(tiles._DEFAULTS_16BIT[family]) | {"BLOCK_M"}, (device, family)
    for family in ("attention_fwd", "attention_bwd_dq"):  # the dk/dv kernel takes any tiles
        for variant, config in tiles.sixteen_bit_variants(family).items():
            assert config["BLOCK_M"] % config["BLOCK_N"] == 0, (variant, family)


def test_attention_rejects_tiles_whose_key_blocks_miss_the_query_tiles():
    from flextron_kernels.triton.attention import attention_fwd

    q = torch.empty(0, 2, 16)
    with pytest.raises(ValueError, match="BLOCK_N must divide BLOCK_M, got 16 and 32"):
        attention_fwd(q, q, q, q, None, None, 2, None, causal=True, softmax_scale=1.0,
                      config=dict(BLOCK_M=16, BLOCK_N=32))


def test_decode_attention_takes_its_family_tiles(fake_gpu, monkeypatch):
    from types import SimpleNamespace

    import importlib

    decode = importlib.import_module("flextron_kernels.ops.elastic_attention_decode")
    monkeypatch.setattr(decode, "_num_sms", lambda index: 132)
    cuda = torch.device("cuda", 0)

    def config(dtype=torch.bfloat16, head_dim=128, kv_len=32768, batch=1):
        q = SimpleNamespace(device=cuda, dtype=dtype, shape=(batch, 32, head_dim), element_size=lambda: dtype.itemsize)
        return decode.decode_config(q, SimpleNamespace(shape=(batch, 8, kv_len, head_dim)), active_kv_heads=8)

    default = config()
    assert default["BLOCK_N"] == 64 and default["num_stages"] == 2
    assert default["num_splits"] == 8 * 132 // 8  # PROGRAMS_PER_SM programs per SM over 8 (request, head) pairs
    with tiles.override_tiles(attention_decode=dict(PROGRAMS_PER_SM=2, BLOCK_N=128, num_stages=4)):
        tuned = config()
        assert tuned["BLOCK_N"] == 128 and tuned["num_stages"] == 4 and tuned["num_splits"] == 2 * 132 // 8
        # fp32 and head dims past the family's range keep their own tiles.
        assert config(torch.float32)["BLOCK_N"] == 32 and config(head_dim=256)["num_warps"] == 8
