"""Tests for the quantization / packing section of train_gpt.py.

train_gpt is imported from sys.path as configured by the caller (PYTHONPATH or a conftest);
this file deliberately does not touch sys.path.
"""
import json
import struct

import pytest
import torch

import train_gpt as tg


def _correlated_problem(rows=48, cols=96, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + 0.3 * torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix  # inputs with a non-identity covariance
    W = torch.randn(rows, cols, generator=g) * 0.02
    return W, X, X.T @ X / n


def _out_err(W, W_hat, X):
    return ((W - W_hat) @ X.T).norm().item()


# ---- grids, RTN, GPTQ ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_gptq_beats_rtn_on_output_error(bits):
    W, X, H = _correlated_problem()
    q, s = tg.gptq_quantize(W, H, bits, 12.0)
    qr, sr = tg.quantize_rtn(W, bits, 12.0)
    assert torch.equal(s, sr)  # same SDClip grid, only the rounding decisions differ
    assert _out_err(W, tg.dequantize(q, s), X) < 0.9 * _out_err(W, tg.dequantize(qr, sr), X)


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
@pytest.mark.parametrize("k", [2.0, 12.0])
def test_values_on_grid_and_clip_respected(bits, k):
    W, X, H = _correlated_problem(seed=bits)
    W[3] *= 50  # an outlier row and clipped entries (k=2) must still respect qmax
    qmax = 2 ** (bits - 1) - 1
    expected_s = (k * W.std(dim=1) / qmax).half()
    assert torch.equal(tg.sdclip_scales(W, bits, k), expected_s)
    for q, s in (tg.gptq_quantize(W, H, bits, k), tg.quantize_rtn(W, bits, k)):
        assert q.dtype == torch.int8 and s.dtype == torch.float16
        assert q.shape == W.shape and s.shape == (W.shape[0],)
        assert int(q.abs().max()) <= qmax
        assert torch.equal(s, expected_s)
        W_hat = tg.dequantize(q, s)
        assert torch.equal(W_hat, q.float() * s.float()[:, None])
        assert torch.equal(torch.round(W_hat / s.float()[:, None]), q.float())
    if k == 2.0:  # heavy clipping actually reaches the edge of the grid
        assert int(tg.quantize_rtn(W, bits, k)[0].abs().max()) == qmax


def test_sdclip_zero_and_constant_rows():
    W = torch.zeros(3, 8)
    W[1] = 0.5  # constant row: std = 0, falls back to absmax/qmax
    s = tg.sdclip_scales(W, 6, 12.0)
    assert torch.all(s > 0) and torch.isfinite(s.float()).all()
    q, s = tg.quantize_rtn(W, 6, 12.0)
    assert torch.allclose(tg.dequantize(q, s), W, rtol=1e-3, atol=0)  # fp16 scale rounding only
    assert torch.all(q[[0, 2]] == 0)


def test_gptq_deterministic():
    W, X, H = _correlated_problem(seed=3)
    a = tg.gptq_quantize(W, H, 6, 10.0, block_size=32)
    b = tg.gptq_quantize(W.clone(), H.clone(), 6, 10.0, block_size=32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # float32 inputs and bf16 weights are accepted too
    q16, _ = tg.gptq_quantize(W.bfloat16(), H.half().float(), 6, 10.0)
    assert q16.shape == W.shape


def test_gptq_act_order_and_block_size_variants():
    W, X, H = _correlated_problem(seed=4)
    rtn = _out_err(W, tg.dequantize(*tg.quantize_rtn(W, 6, 12.0)), X)
    for act_order in (True, False):
        for bs in (16, 128, 1000):
            q, s = tg.gptq_quantize(W, H, 6, 12.0, block_size=bs, act_order=act_order)
            assert _out_err(W, tg.dequantize(q, s), X) < rtn


def test_gptq_dead_columns():
    W, X, _ = _correlated_problem(seed=5)
    X[:, [0, 7, 50]] = 0.0
    H = X.T @ X / X.shape[0]
    q, s, info = tg.gptq_quantize(W, H, 6, 12.0, return_info=True)
    assert info["fallback"] is None and info["retries"] == 0
    assert torch.all(q[:, [0, 7, 50]] == 0)
    assert torch.isfinite(tg.dequantize(q, s)).all()


def test_gptq_damping_retry_and_fallback():
    W, _, _ = _correlated_problem(rows=8, cols=16)
    # Indefinite H: diag 1, off-diag 2 -> eigenvalues 31 and -1. Needs relative damping > 1.
    H = torch.full((16, 16), 2.0) - torch.eye(16)
    q, s, info = tg.gptq_quantize(W, H, 6, 12.0, return_info=True)
    assert info["fallback"] is None and info["retries"] == 3 and info["damp"] == pytest.approx(10.0)
    # Hopeless H: falls back to RTN on the same grid instead of crashing.
    for bad in (-1000.0 * torch.eye(16), torch.full((16, 16), float("nan"))):
        q, s, info = tg.gptq_quantize(W, bad, 6, 12.0, return_info=True)
        assert info["fallback"] is not None
        qr, sr = tg.quantize_rtn(W, 6, 12.0)
        assert torch.equal(q, qr) and torch.equal(s, sr)
    with pytest.raises(ValueError, match="Hessian shape"):
        tg.gptq_quantize(W, torch.eye(15), 6, 12.0)


def test_int8_row_quantization():
    W = torch.randn(8, 12) * 0.3
    q, s = tg.quantize_absmax_rows(W)
    assert int(q.abs().max()) == 127 and torch.equal(s, (W.abs().amax(1) / 127).half())
    assert (tg.dequantize(q, s) - W).abs().max() <= s.float().max() * 0.51 + 1e-6


# ---- LQER --------------------------------------------------------------------------------

def _lqer_problem():
    # Quantization error = a rank-3 component plus small white noise: what LQER is meant to fix.
    g = torch.Generator().manual_seed(7)
    W = torch.randn(128, 256, generator=g) * 0.02
    low_rank = (torch.randn(128, 3, generator=g) @ torch.randn(3, 256, generator=g)) * 3e-3
    return W, W - low_rank - 1e-3 * torch.randn(128, 256, generator=g)


@pytest.mark.parametrize("refit", [False, True])
def test_lqer_asym_reduces_error_and_is_on_grid(refit):
    W, W_hat = _lqer_problem()
    f = tg.lqer_factors(W, W_hat, rank=4, asym=True, group=64, refit=refit)
    assert f["mode"] == "asym" and f["rank"] == 4
    assert f["a_q"].shape == (128, 4) and f["b_q"].shape == (4, 256)
    assert f["a_s"].dtype == torch.float16 and f["a_s"].numel() == 1
    assert f["b_s"].dtype == torch.float16 and f["b_s"].numel() == 4 * 256 // 64
    assert set(f["a_q"].unique().tolist()) <= {-2, -1, 0, 1}
    assert int(f["b_q"].min()) >= -8 and int(f["b_q"].max()) <= 7
    if not refit:
        U, S, Vh = torch.linalg.svd((W - W_hat).double(), full_matrices=False)
        assert torch.equal(f["a_s"], ((U[:, :4] * S[:4]).abs().max() / 1.5).half().reshape(1))
    corrected = tg.lqer_apply(W_hat, f)
    assert (W - corrected).norm() < 0.8 * (W - W_hat).norm()


def test_lqer_symmetric_fallback():
    W, W_hat = _lqer_problem()
    W, W_hat = W[:, :250], W_hat[:, :250]  # 4*250 not divisible by 64 -> symmetric per-row INT4
    f = tg.lqer_factors(W, W_hat, rank=4, asym=True, group=64)
    assert f["mode"] == "sym" and f["a_s"].shape == (128,) and f["b_s"].shape == (4,)
    assert int(f["a_q"].abs().max()) <= 7 and int(f["b_q"].abs().max()) <= 7
    assert (W - tg.lqer_apply(W_hat, f)).norm() < 0.8 * (W - W_hat).norm()


def test_select_lqer_targets():
    errs = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 3.0}
    assert tg.select_lqer_targets(errs, 3) == ["b", "d", "c"]
    assert tg.select_lqer_targets(errs, 0) == []


# ---- container -------------------------------------------------------------------------------

def _all_dtype_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "i8": torch.randint(-128, 128, (5, 7), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 256, (9,), dtype=torch.uint8, generator=g),
        "i16": torch.randint(-30000, 30000, (3, 4), dtype=torch.int16, generator=g),
        "i32": torch.randint(-2 ** 31, 2 ** 31 - 1, (6,), dtype=torch.int32, generator=g),
        "f16": torch.randn(4, 3, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "f32": torch.randn(11, generator=g),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.25),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "i64": torch.tensor([1, -2, 2 ** 40]),
        "flag": torch.tensor([True, False, True]),
        "i8_again": torch.tensor([1, 2, 3], dtype=torch.int8),
    }


def test_pack_roundtrip_every_dtype():
    ts = _all_dtype_tensors()
    meta = {"scheme": {"a": "gptq"}, "x": [1, 2.5, None], "s": "é"}
    blob = tg.pack_state(ts, meta)
    assert blob[:4] == b"PGQ1"
    out, meta2 = tg.unpack_state(blob)
    assert list(out) == list(ts) and meta2 == meta
    for k, t in ts.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape
        assert torch.equal(out[k], t), k
    # same-dtype tensors are stored contiguously (int8 group first)
    (hlen,) = struct.unpack("<I", blob[4:8])
    entries = {e["name"]: e for e in json.loads(blob[8:8 + hlen])["tensors"]}
    assert entries["i8_again"]["offset"] == entries["i8"]["offset"] + entries["i8"]["nbytes"]
    assert tg.unpack_state(memoryview(blob))[0].keys() == ts.keys()


def test_pack_non_contiguous_input():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    out, _ = tg.unpack_state(tg.pack_state({"t": t}))
    assert torch.equal(out["t"], t)


def _blob_with_header(header, data=b""):
    h = json.dumps(header).encode()
    return b"PGQ1" + struct.pack("<I", len(h)) + h + data


@pytest.mark.parametrize("mutate, msg", [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:5], "truncated"),
    (lambda b: b[:-3], "checksum"),  # version 2 closes with a CRC32 of everything before it
    (lambda b: b + b"junk", "checksum"),
    (lambda b: b[:4] + struct.pack("<I", 10 ** 6) + b[8:], "header length"),
    (lambda b: b[:8] + b"\xff" + b[9:], "JSON"),
])
def test_unpack_rejects_corruption(mutate, msg):
    blob = tg.pack_state(_all_dtype_tensors(), {"m": 1})
    with pytest.raises(ValueError, match=msg):
        tg.unpack_state(mutate(blob))


@pytest.mark.parametrize("entry, msg", [
    ({"name": "a", "dtype": "float32", "shape": [2], "offset": 4, "nbytes": 8}, "out of range"),
    ({"name": "a", "dtype": "float32", "shape": [2], "offset": -1, "nbytes": 8}, "offset"),
    ({"name": "a", "dtype": "float32", "shape": [3], "offset": 0, "nbytes": 8}, "does not match"),
    ({"name": "a", "dtype": "complex64", "shape": [1], "offset": 0, "nbytes": 8}, "dtype"),
    ({"name": "a", "dtype": "float32", "shape": [-2], "offset": 0, "nbytes": 8}, "shape"),
    ({"name": "", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}, "name"),
])
def test_unpack_rejects_bad_entries(entry, msg):
    blob = _blob_with_header({"version": 1, "tensors": [entry], "meta": {}}, b"\0" * 8)
    with pytest.raises(ValueError, match=msg):
        tg.unpack_state(blob)


def test_unpack_rejects_overlap_and_duplicates():
    e = {"name": "a", "dtype": "int8", "shape": [4], "offset": 0, "nbytes": 4}
    with pytest.raises(ValueError, match="overlaps"):
        tg.unpack_state(_blob_with_header(
            {"version": 1, "tensors": [e, dict(e, name="b", offset=2)], "meta": {}}, b"\0" * 6))
    with pytest.raises(ValueError, match="duplicate"):
        tg.unpack_state(_blob_with_header(
            {"version": 1, "tensors": [e, dict(e, offset=4)], "meta": {}}, b"\0" * 8))
    with pytest.raises(ValueError, match="version"):
        tg.unpack_state(_blob_with_header({"tensors": []}))


# ---- shuffle + compression ---------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 1000])
def test_byte_shuffle_roundtrip(stride, n):
    data = bytes((i * 37 + 11) % 256 for i in range(n))
    sh = tg.byte_shuffle(data, stride)
    assert sh[:4] == b"BSHF" and sh[4] == stride and len(sh) == n + 5
    assert tg.byte_unshuffle(sh) == data
    if stride == 2 and n == 5:
        assert sh[5:] == data[0::2] + data[1::2]
    with pytest.raises(ValueError):
        tg.byte_unshuffle(data + b"xxxxx" if not data.startswith(b"BSHF") else b"nope!")


def _need_codec(compressor):
    if compressor in ("brotli", "zstd"):
        pytest.importorskip("brotli" if compressor == "brotli" else "zstandard")


@pytest.mark.parametrize("compressor", ["brotli", "zstd", "lzma", "none"])
@pytest.mark.parametrize("shuffle", [0, 2, 4])
def test_compress_roundtrip_autodetect(compressor, shuffle):
    _need_codec(compressor)
    raw = tg.pack_state(_all_dtype_tensors(), {"k": 1}) * 3
    blob = tg.compress_blob(raw, compressor, shuffle)
    assert blob[:3] == b"PGZ"
    assert tg.decompress_blob(blob) == raw
    tricky = b"BSHF" + raw  # payload that itself looks shuffled must survive untouched
    assert tg.decompress_blob(tg.compress_blob(tricky, compressor, 0)) == tricky


def test_compress_errors():
    with pytest.raises(ValueError, match="unknown compressor"):
        tg.compress_blob(b"abc", "zip")
    with pytest.raises(ValueError, match="PGZ"):
        tg.decompress_blob(b"hello world")
    with pytest.raises(ValueError, match="codec"):
        tg.decompress_blob(b"PGZQ123")
    blob = tg.compress_blob(b"x" * 1000, "lzma")
    with pytest.raises(ValueError, match="corrupt"):
        tg.decompress_blob(blob[:4] + b"\x00garbage" + blob[12:])


def test_missing_codec_message(monkeypatch):
    def no_module(name, *a, **k):
        raise ImportError(name)
    monkeypatch.setattr(tg.importlib, "import_module", no_module)
    with pytest.raises(RuntimeError, match="pip install brotli"):
        tg.compress_blob(b"abc", "brotli")
    with pytest.raises(RuntimeError, match="pip install zstandard"):
        tg.decompress_blob(b"PGZZ" + b"abc")


# ---- state-dict driver -----------------------------------------------------------------------

def _toy_state():
    W, X, H = _correlated_problem(rows=64, cols=128, seed=11)
    g = torch.Generator().manual_seed(12)
    sd = {
        "blocks.0.attn.w": W.clone(),
        "blocks.0.mlp.fc": (torch.randn(128, 128, generator=g) * 0.02).bfloat16(),
        "blocks.0.mlp.proj": torch.randn(32, 128, generator=g) * 0.02,
        "blocks.0.attn.gate": torch.randn(8, 12, generator=g),
        "blocks.0.scale": torch.randn(128, generator=g),
        "norm.eps_like": torch.tensor(0.5, dtype=torch.float64),
        "step": torch.tensor([42]),
    }
    hess = {"blocks.0.attn.w": H, "blocks.0.mlp.fc": H, "blocks.0.mlp.proj": H}
    plan = {
        "blocks.0.attn.w": ("gptq", 6, 12.0),
        "blocks.0.mlp.fc": ("gptq", 5, 10.0, 0.02),
        "blocks.0.mlp.proj": ("rtn", 7, 14.0),
        "blocks.0.attn.gate": ("int8_row",),
        "blocks.0.scale": ("fp16",),
        "norm.eps_like": ("fp32",),
        "step": ("raw",),
    }
    return sd, hess, plan


@pytest.mark.parametrize("lqer", [False, True])
def test_quantize_state_dict_roundtrip(lqer):
    sd, hess, plan = _toy_state()
    kw = dict(lqer_rank=4, lqer_top_k=2, lqer_group=64) if lqer else {}
    tensors, meta = tg.quantize_state_dict(sd, hess, plan, **kw)
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert tensors["blocks.0.attn.w.q"].dtype == torch.int8
    assert tensors["blocks.0.attn.w.scale"].dtype == torch.float16
    assert meta["tensors"]["blocks.0.mlp.fc"]["dtype"] == "bfloat16"
    st = meta["stats"]["blocks.0.attn.w"]
    assert st["gptq"]["damp"] == 0.01 and "rel_out" in st and 0 < st["rel_fro"] < 0.2
    assert meta["stats"]["blocks.0.mlp.fc"]["gptq"]["damp"] == 0.02

    # through the real container and a compressor, with the decode-only meta
    blob = tg.serialize_state(tensors, tg.meta_for_storage(meta), "lzma", 2)
    tensors2, meta2 = tg.deserialize_state(blob)
    sd2 = tg.dequantize_state_dict(tensors2, meta2)
    assert list(sd2) == list(sd)
    for k, t in sd.items():
        assert sd2[k].dtype == t.dtype and sd2[k].shape == t.shape, k
    assert torch.equal(sd2["blocks.0.scale"], sd["blocks.0.scale"].half().float())
    assert torch.equal(sd2["norm.eps_like"], sd["norm.eps_like"].float().double())
    assert torch.equal(sd2["step"], sd["step"])
    for name in ("blocks.0.attn.w", "blocks.0.mlp.proj", "blocks.0.attn.gate", "blocks.0.mlp.fc"):
        qs = tg.dequantize(tensors[name + ".q"], tensors[name + ".scale"])
        if "lqer" in meta["tensors"][name]:
            f = dict(meta["tensors"][name]["lqer"],
                     **{k: tensors[f"{name}.lqer.{k}"] for k in ("a_q", "a_s", "b_q", "b_s")})
            qs = qs + tg.lqer_delta(f)
        assert torch.equal(sd2[name], qs.to(sd[name].dtype)), name
    if lqer:
        with_lqer = [n for n, e in meta["tensors"].items() if "lqer" in e]
        assert 1 <= len(with_lqer) <= 2 and "blocks.0.attn.gate" not in with_lqer
        for n in with_lqer:
            assert meta["stats"][n]["lqer_rel_fro"] < meta["stats"][n]["rel_fro"]


def test_quantize_state_dict_plan_errors_and_callable():
    sd, hess, plan = _toy_state()
    with pytest.raises(ValueError, match="no quantization plan"):
        tg.quantize_state_dict(sd, hess, {k: v for k, v in plan.items() if k != "step"})
    with pytest.raises(ValueError, match="no Hessian"):
        tg.quantize_state_dict(sd, {}, plan)
    tensors, meta = tg.quantize_state_dict(sd, {}, plan, on_missing_hessian="rtn")
    assert meta["tensors"]["blocks.0.attn.w"]["scheme"] == "rtn"

    pats = [(r"\.gate$", ("int8_row",), 32, 8192), (r"\.attn\.", ("gptq", 6, 13.0)),
            (r"^step$", ("raw",))]
    assert tg.classify_tensor("blocks.0.attn.gate", 96, 2, pats) == ("int8_row",)
    assert tg.classify_tensor("blocks.0.mlp.proj", 4096, 2, pats) == ("fp16",)
    assert tg.classify_tensor("blocks.0.mlp.proj", 10 ** 6, 2, pats) == ("gptq", 6, 12.85)

    def plan_fn(name, t):
        return tg.classify_tensor(name, t.numel(), t.ndim, pats, small_numel=1000)
    tensors, meta = tg.quantize_state_dict(sd, hess, plan_fn)
    schemes = {k: e["scheme"] for k, e in meta["tensors"].items()}
    assert schemes["blocks.0.attn.gate"] == "int8_row" and schemes["step"] == "raw"
    assert schemes["blocks.0.mlp.fc"] == "gptq" and schemes["blocks.0.scale"] == "fp16"
    with pytest.raises(ValueError, match="meta"):
        tg.dequantize_state_dict(tensors, {})
    with pytest.raises(ValueError, match="missing stored tensor"):
        tg.dequantize_state_dict({}, meta)


# ---- AWQ-lite (PR #1908): salient input-column groups at higher bits inside the GPTQ solve ---------------------

PRE_AWQ_COMMIT = "9e30192"  # the last train_gpt.py without AWQ-lite: AWQ-off artifacts must keep its bytes


def _salient_problem(rows=48, cols=256, n=2048, group=2, seed=3):
    """Correlated inputs whose columns of group `group` (64 wide) carry 8x the activation: the salient group."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + 0.5 * torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix
    X[:, group * 64:(group + 1) * 64] *= 8
    W = torch.randn(rows, cols, generator=g) * 0.02
    return W, X, X.T @ X / n


def _h_err(W, W_hat, H):
    E = (W - W_hat).double()
    return float(((E @ H.double()) * E).sum() / ((W.double() @ H.double()) * W.double()).sum())


def _gptq_reference(W, H, bits, k, hi_cols, hi_bits, damp=0.01):
    """Textbook GPTQ, one column at a time, no blocks and no act-order: quantize column j on its own grid (the mixed
    AWQ grid), then spread its error over every later column with the row j of the upper Cholesky factor of H^-1."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    s = tg.sdclip_scales(W.float(), bits, k).double()
    s_hi = tg.awq_hi_scale(s.half(), bits, hi_bits).double()
    hi = set(hi_cols.tolist())
    Q = torch.zeros_like(W)
    for j in range(cols):
        sj, qm = (s_hi, tg._qmax(hi_bits)) if j in hi else (s, tg._qmax(bits))
        Q[:, j] = torch.clamp(torch.round(W[:, j] / sj), -qm, qm)
        e = (W[:, j] - Q[:, j] * sj) / U[j, j]
        W[:, j:] -= e[:, None] * U[j, j:][None, :]
    return Q.to(torch.int8)


def test_awq_saliency_formula():
    W, X, H = _salient_problem()
    assert tg.awq_salient_groups(W, H, 64, 1) == [2]
    # the score is sum_j sqrt(H_jj) * mean_r |W_rj| per group: a group of large weights wins over equal activations
    W2, H2 = torch.full((4, 8), 0.01), torch.eye(8)
    W2[:, 4:6] = 1.0
    assert tg.awq_salient_groups(W2, H2, 2, 1) == [2] and tg.awq_salient_groups(W2, H2, 2, 3) == [0, 1, 2]
    H2[0, 0] = 1e6  # ... and a loud column wins over large weights
    assert tg.awq_salient_groups(W2, H2, 2, 1) == [0]
    assert tg.awq_salient_groups(W2, H2, 3, 3) == [0, 1, 2]  # the last group is short (cols 6..7)
    assert tg.awq_columns([0, 2], 3, 8).tolist() == [0, 1, 2, 6, 7]


def test_awq_gptq_mixed_bits_matches_reference_and_lowers_error():
    W, X, H = _salient_problem()
    hi = tg.awq_columns([2], 64, W.shape[1])
    q_off, s_off = tg.gptq_quantize(W, H, 6, 12.0)
    q, s = tg.gptq_quantize(W, H, 6, 12.0, hi_cols=hi, hi_bits=8)
    assert torch.equal(s, s_off), "the per-row scale is the tensor's own: AWQ stores no second scale"
    lo = torch.ones(W.shape[1], dtype=torch.bool)
    lo[hi] = False
    assert q[:, lo].abs().max() <= 31 and 31 < q[:, hi].abs().max() <= 127, "the salient group really is on the int8 grid"
    W_awq = tg.dequantize_entry(q, s, {"bits": 6, "awq": {"bits": 8, "group_size": 64, "groups": [2]}})
    assert torch.equal(W_awq[:, lo], tg.dequantize(q, s)[:, lo])
    e_awq, e_off = _h_err(W, W_awq, H), _h_err(W, tg.dequantize(q_off, s_off), H)
    assert e_awq < 0.5 * e_off, (e_awq, e_off)
    # the GPTQ error feedback with a grid per column equals the textbook one-column-at-a-time solve (blocks of 32, no
    # act-order; float64 in both, so only ties at a rounding boundary could differ)
    q_blk = tg.gptq_quantize(W, H, 6, 12.0, block_size=32, act_order=False, hi_cols=hi, hi_bits=8)[0]
    ref = _gptq_reference(W, H, 6, 12.0, hi, 8)
    assert (q_blk != ref).float().mean() < 1e-3
    # act-order permutes the columns: the high-precision ones follow their indices
    assert _h_err(W, tg.dequantize_entry(q, s, {"bits": 6, "awq": {"bits": 8, "group_size": 64, "groups": [2]}}), H) < e_off
    # RTN fallback (Cholesky impossible) keeps the mixed grid
    qf, sf, info = tg.gptq_quantize(W, torch.full_like(H, float("nan")), 6, 12.0, hi_cols=hi, hi_bits=8, return_info=True)
    assert info["fallback"] and 31 < qf[:, hi].abs().max() <= 127 and qf[:, lo].abs().max() <= 31


def test_awq_off_is_bit_identical():
    W, X, H = _salient_problem()
    q0, s0 = tg.gptq_quantize(W, H, 6, 12.0)
    q1, s1 = tg.gptq_quantize(W, H, 6, 12.0, hi_cols=torch.zeros(0, dtype=torch.long), hi_bits=8)
    assert torch.equal(q0, q1) and torch.equal(s0, s1)
    sd, hess, plan = _toy_state()
    tensors, meta = tg.quantize_state_dict(sd, hess, plan)
    assert meta["format"] == "pgq-state-v1" and not any("awq" in e for e in meta["tensors"].values())
    blob = tg.serialize_state(tensors, tg.meta_for_storage(meta), "brotli")
    # the same state through the train_gpt.py before AWQ-lite existed: the same bytes
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path
    root = Path(tg.__file__).resolve().parent
    old = subprocess.run(["git", "show", f"{PRE_AWQ_COMMIT}:train_gpt.py"], cwd=root, capture_output=True)
    if old.returncode != 0:
        pytest.skip(f"git history without commit {PRE_AWQ_COMMIT}")
    path = Path(__import__("tempfile").mkdtemp()) / "train_gpt_pre_awq.py"
    path.write_bytes(old.stdout)
    spec = importlib.util.spec_from_file_location("train_gpt_pre_awq", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt_pre_awq"] = mod
    try:
        spec.loader.exec_module(mod)
        t_old, m_old = mod.quantize_state_dict(sd, hess, plan)
        assert mod.serialize_state(t_old, mod.meta_for_storage(m_old), "brotli") == blob
    finally:
        sys.modules.pop("train_gpt_pre_awq", None)


def test_awq_artifact_roundtrip():
    sd, hess, plan = _toy_state()
    off, meta_off = tg.quantize_state_dict(sd, hess, plan)
    tensors, meta = tg.quantize_state_dict(sd, hess, plan, awq=(8, 1, 64))
    assert meta["format"] == "pgq-state-v2" and set(tensors) == set(off), "AWQ stores no extra tensor"
    awq = {n: e["awq"] for n, e in meta["tensors"].items() if "awq" in e}
    assert set(awq) == {"blocks.0.attn.w", "blocks.0.mlp.fc"}, "GPTQ tensors only (the RTN one keeps its grid)"
    assert all(a["bits"] == 8 and a["group_size"] == 64 and len(a["groups"]) == 1 for a in awq.values())
    for n in awq:
        st, st_off = meta["stats"][n], meta_off["stats"][n]
        assert st["rel_out"] < st_off["rel_out"] and st["awq"]["columns"] == 64
        assert st["awq"]["extra_bits_raw"] == sd[n].shape[0] * 64 * (8 - meta["tensors"][n]["bits"])
    summary = tg.awq_summary(meta)
    assert summary["tensors"] == 2 and summary["columns"] == 128 and summary["extra_bytes_raw"] == (64 * 64 * 2 + 128 * 64 * 3) // 8
    assert 0 < summary["extra_bytes_entropy"]
    blob = tg.serialize_state(tensors, tg.meta_for_storage(meta), "brotli")
    tensors2, meta2 = tg.deserialize_state(blob)
    sd2 = tg.dequantize_state_dict(tensors2, meta2)
    for n, a in awq.items():
        cols = tg.awq_columns(a["groups"], 64, sd[n].shape[1])
        e = meta["tensors"][n]
        step = tg.awq_hi_scale(tensors[n + ".scale"], e["bits"], 8)
        assert torch.equal(sd2[n].float()[:, cols], (tensors[n + ".q"][:, cols].float() * step[:, None]).to(sd[n].dtype).float())
        assert torch.equal(sd2[n], tg.dequantize_entry(tensors[n + ".q"], tensors[n + ".scale"], e).to(sd[n].dtype))
    assert torch.equal(sd2["blocks.0.mlp.proj"], tg.dequantize_state_dict(off, meta_off)["blocks.0.mlp.proj"])
    # a manifest that names AWQ columns must be v2 and well formed
    for bad in (dict(meta2, format="pgq-state-v1"),
                {**meta2, "tensors": {**meta2["tensors"], "blocks.0.attn.w": {**meta2["tensors"]["blocks.0.attn.w"], "awq": {"bits": 8, "group_size": 64, "groups": [2]}}}},
                {**meta2, "tensors": {**meta2["tensors"], "blocks.0.attn.w": {**meta2["tensors"]["blocks.0.attn.w"], "awq": {"bits": 5, "group_size": 64, "groups": [0]}}}}):
        with pytest.raises(ValueError, match="AWQ"):
            tg.dequantize_state_dict(tensors2, bad)
    # with LQER on top, the correction is fitted to the AWQ reconstruction
    t3, m3 = tg.quantize_state_dict(sd, hess, plan, awq=(8, 1, 64), lqer_rank=4, lqer_top_k=2, lqer_group=64)
    sd3 = tg.dequantize_state_dict(*tg.deserialize_state(tg.serialize_state(t3, tg.meta_for_storage(m3), "brotli")))
    both = [n for n, e in m3["tensors"].items() if "lqer" in e and "awq" in e]
    assert both
    for n in both:  # (the bf16 tensor's stored weights are rounded to bf16 once more)
        assert float((sd3[n].double() - sd[n].double()).norm() / sd[n].double().norm()) == pytest.approx(m3["stats"][n]["lqer_rel_fro"], rel=2e-3)


def test_awq_model_artifact_and_config():
    """A model config with AWQ on: quant_plan's GPTQ tensors get their groups, load_artifact gives back exactly
    dequantize_state_dict's weights; the config checks name the variable."""
    env = dict(VOCAB_SIZE="64", NUM_LAYERS="2", MODEL_DIM="160", NUM_HEADS="4", NUM_KV_HEADS="2", NUM_LOOPS="0", PARALLEL_START_LAYER="0",
               TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="64", COMPILE="0", TTT_ENABLED="0", AWQ_LITE_ENABLED="1", AWQ_LITE_GROUP_SIZE="32")
    cfg = tg.Config.from_env(env)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    plan = tg.quant_plan(cfg, tg.param_roles(model))
    g = torch.Generator().manual_seed(1)
    hess = {}
    for n, t in model.state_dict().items():
        if plan(n, t)[0] == "gptq":
            X = torch.randn(256, t.shape[1], generator=g)
            hess[n] = X.T @ X / 256
    tensors, qmeta = tg.quantize_model(model, cfg, hess)
    awq = {n for n, e in qmeta["tensors"].items() if "awq" in e}
    assert awq and awq == set(hess) - ({"tok_emb.weight"} if cfg.embed_bits >= cfg.awq_lite_bits else set())
    loaded, lcfg = tg.load_artifact(tg.build_artifact(tensors, qmeta, cfg, 1), torch.device("cpu"))
    assert lcfg.awq_lite_enabled and loaded.asym_softcap is None
    expect = tg.dequantize_state_dict(tensors, qmeta)
    assert all(torch.equal(v, expect[k].to(v.dtype)) for k, v in loaded.state_dict().items())
    for bad, msg in ((dict(QUANT="rtn"), "AWQ_LITE_ENABLED"), (dict(AWQ_LITE_BITS="6"), "AWQ_LITE_BITS"),
                     (dict(AWQ_LITE_GROUP_TOP_K="0"), "AWQ_LITE_GROUP_TOP_K"), (dict(AWQ_LITE_GROUP_SIZE="0"), "AWQ_LITE_GROUP_SIZE")):
        with pytest.raises(tg.ConfigError, match=msg):
            tg.Config.from_env(dict(env, **bad))
    assert not tg.Config.from_env({}).awq_lite_enabled
