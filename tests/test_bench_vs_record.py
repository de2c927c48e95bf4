"""bench/bench_vs_record.py and its flash_attn_interface stand-in, on the CPU: the stand-in's attention against a
per-document reference, the harness's data preparation (both loaders read the same micro-batches across wraps),
the record-log parsing and hyperparameter alignment, the log parsers, and an ours-only run of the harness."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RECORDS = SHARED / "reference" / "records"
sys.path.insert(0, str(ROOT / "bench"))
import bench_vs_record as bvr  # noqa: E402


@pytest.fixture(scope="module")
def standin():
    os.environ["STANDIN_ATTN"] = "sdpa"
    try:
        spec = importlib.util.spec_from_file_location("standin_flash_attn_interface", ROOT / "bench" / "fa_standin" / "flash_attn_interface.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        os.environ.pop("STANDIN_ATTN")
    assert mod.KERNEL == "sdpa"
    return mod


def per_document_reference(q, k, v, cu, window=0):
    """Attention computed document by document: each segment alone, causal, GQA by repeating K/V heads."""
    out = torch.zeros_like(q)
    r = q.size(1) // k.size(1)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        if b <= a:
            continue
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(r, 0), v[a:b].transpose(0, 1).repeat_interleave(r, 0)
        s = (qs @ ks.transpose(-1, -2)) / q.size(-1) ** 0.5
        i = torch.arange(b - a)
        m = i[:, None] >= i[None, :]
        if window:
            m = m & (i[:, None] - i[None, :] <= window)
        out[a:b] = torch.softmax(s.masked_fill(~m, float("-inf")), -1).matmul(vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [0, 5])
def test_standin_varlen_matches_per_document_reference(standin, seed, window):
    g = torch.Generator().manual_seed(seed)
    N, H, Hkv, D = 96, 4, 2, 8
    q, k, v = (torch.randn(N, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    ids = torch.randint(2, 9, (1, N), generator=g)
    ids[0, torch.randint(0, N, (seed + 1,), generator=g)] = 1
    cu = torch.from_numpy(tg.doc_cu_seqlens(ids.numpy(), 1, 32))  # BOS cuts + 32-token pieces, padded with N
    got = standin.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=32, max_seqlen_k=32,
                                         causal=True, window_size=(window, 0) if window else (-1, -1))
    torch.testing.assert_close(got, per_document_reference(q, k, v, cu, window))


def test_standin_dense_and_argument_checks(standin):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 20, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    cu = torch.tensor([0, 20, 40], dtype=torch.int32)
    dense = standin.flash_attn_func(q, k, v, causal=True)
    flat = per_document_reference(q.reshape(40, 4, 8), k.reshape(40, 2, 8), v.reshape(40, 2, 8), cu)
    torch.testing.assert_close(dense, flat.view(2, 20, 4, 8))  # rows = documents
    with pytest.raises(NotImplementedError, match="causal attention only"):
        standin.flash_attn_func(q, k, v, causal=False)
    with pytest.raises(NotImplementedError, match="softmax scale"):
        standin.flash_attn_func(q, k, v, causal=True, softmax_scale=0.1)
    with pytest.raises(NotImplementedError, match="unsupported arguments"):
        standin.flash_attn_func(q, k, v, causal=True, softcap=5.0)


def _source(tmp_path: Path, n_train=50_000, n_val=9_000, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    src = tmp_path / "src"
    src.mkdir()
    train = rng.integers(2, 500, n_train)
    train[rng.integers(0, n_train, 60)] = 1
    train[:5] = 7  # a partial document before the first BOS: dropped by prepare_data
    val = rng.integers(2, 500, n_val)
    val[::300] = 1
    tg.write_shard(src / "fineweb_train_000000.bin", train)
    tg.write_shard(src / "fineweb_val_000000.bin", val)
    (src / "tok.model").write_bytes(b"not a real tokenizer: copied only")
    return src


def test_prepare_data_aligns_both_loaders(tmp_path):
    src = _source(tmp_path)
    out = tmp_path / "prepared"
    micro, T = 1024, 128
    info = bvr.prepare_data(src, src / "tok.model", out, micro, T)
    train = np.asarray(tg.load_shard(out / "fineweb_train_000000.bin"))
    val = np.asarray(tg.load_shard(out / "fineweb_val_000000.bin"))
    assert train[0] == 1 and train.size % (micro + 1) == 0 and info["train_tokens"] == train.size
    assert (val.size - 1) % T == 0 and val.size == info["val_tokens"] and (out / "tokenizer.model").read_bytes().startswith(b"not a real")
    # The record's loader reads consecutive spans of micro+1 tokens from the shard start and restarts at the first
    # BOS of the shard when the next span does not fit; ours streams across the wrap. On the prepared shard they agree.
    k = train.size // (micro + 1)
    loader = tg.DistributedLoader([str(out / "fineweb_train_000000.bin")], 0, 1, micro, T, torch.device("cpu"), prefetch=0, doc=(1, T))
    for i in range(int(2.5 * k)):
        x, y, cu = loader.next()
        span = train[(i % k) * (micro + 1):(i % k + 1) * (micro + 1)]
        assert np.array_equal(x[0].numpy(), span[:-1]) and np.array_equal(y[0].numpy(), span[1:]), i


TOK8192 = SHARED / "data" / "tokenizers" / "fineweb_8192_bpe.model"


@pytest.mark.skipif(not TOK8192.exists(), reason="../shared/data/tokenizers is absent (the challenge sp8192 tokenizer)")
def test_prepare_data_writes_the_byte_sidecar_the_record_eval_reads(tmp_path):
    """The record's pre-quant eval reads a byte sidecar even on plain data (without one it died after 200 steps on the
    H200). prepare_data writes it from the tokenizer's byte rule: its per-target counts are our LUT counts, and
    train_gpt loads it for the same val shard."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(TOK8192))
    text = ["Hello world, this is a test.", "Zweite Zeile: Grüße, naïve café — ok?", "  spaces  and\ttabs\n"] * 40
    ids = [t for doc in text for t in [1] + sp.encode(doc)]
    src = tmp_path / "src"
    src.mkdir()
    tg.write_shard(src / "fineweb_train_000000.bin", np.array(ids * 3))
    tg.write_shard(src / "fineweb_val_000000.bin", np.array(ids))
    out = tmp_path / "prepared"
    info = bvr.prepare_data(src, TOK8192, out, 256, 64)
    val = np.asarray(tg.load_shard(out / "fineweb_val_000000.bin")).astype(np.int64)
    side = tg.load_val_byte_sidecar(str(out), val.size)
    luts = tg.build_byte_luts(sp, 8192)
    assert side is not None and side[0] == 0
    assert np.array_equal(side[1:], tg.target_bytes(val[:-1], val[1:], luts))
    assert info["val_bytes"] == int(side.sum()) > 0
    # on text without a partial first document the counts are the UTF-8 bytes of the decoded text
    assert info["val_bytes"] == sum(len(sp.decode([int(t) for t in val[a + 1:b]]).encode()) for a, b in
                                    zip(*(lambda s: (s, np.append(s[1:], val.size)))(np.flatnonzero(val == 1))))


@pytest.mark.skipif(not RECORDS.exists(), reason="../shared/reference/records is absent (the record scripts and logs)")
@pytest.mark.parametrize("script,log", list(bvr.RECORD_LOGS.items()))
def test_record_hparams_env_and_alignment(script, log):
    hp = bvr.record_hparams(RECORDS / log)
    names = bvr.record_env_names(RECORDS / script)
    env = bvr.record_env(hp, names)
    assert env["NUM_LAYERS"] == "11" and env["SMEAR_GATE_ENABLED"] == "1" and env["LQER_ENABLED"] == "1"
    assert not (set(env) & bvr.RUN_KEYS) and "RANK" not in env and "DATASETS_DIR" not in env  # run settings are ours to set
    cfg = tg.Config.from_env({}, warn=lambda m: None)
    al = bvr.alignment(hp, cfg, names)
    same = {d["name"] for d in al["same"]}
    differ = {d["name"]: d for d in al["differ"]}
    assert {"NUM_LAYERS", "MODEL_DIM", "MATRIX_LR", "EMA_DECAY", "SMEAR_GATE_ENABLED"} <= same
    ttt = {"PHASED_TTT_NUM_PHASES", "TTT_LORA_RANK", "TTT_BETA2", "TTT_WEIGHT_DECAY", "PHASED_TTT_PREFIX_DOCS", "TTT_CHUNK_SIZE",
           "TTT_BATCH_SIZE", "GLOBAL_TTT_LR", "GLOBAL_TTT_CHUNK_TOKENS"}  # phased TTT: the records' names read as ours
    if script == "pr1868_train_gpt.py":  # #1868 trained with AdamW beta2 0.95 and warmdown 0.75; our defaults are #1855's
        assert differ["BETA2"]["record"] == "0.95" and "WARMDOWN_FRAC" in differ
        assert differ["TTT_LORA_RANK"]["record"] == "96" and differ["PHASED_TTT_PREFIX_DOCS"]["record"] == "2000"
    else:
        assert "BETA2" in same and "WARMDOWN_FRAC" in same
        assert ttt <= same and not any("TTT" in d for d in differ)


def test_log_parsers_and_interval_speeds():
    rec = "\n".join(["warmup_step: 1/2", "1/40 train_loss: 9.0000 train_time: 0.0m tok/s: 100000",
                     "5/40 train_loss: 8.0000 train_time: 0.0m tok/s: 125000", "10/40 train_loss: 7.5000 train_time: 0.1m tok/s: 125000",
                     "layer_loop:enabled step:12 frac:0.300 encoder:[0] decoder:[1]",
                     "15/40 train_loss: 7.0000 train_time: 0.1m tok/s: 100000", "20/40 train_loss: 6.5 train_time: 0.1m tok/s: 80000",
                     "diagnostic pre-quantization post-ema val_loss:6.12345678 val_bpb:3.21000000 eval_time:10ms"])
    p = bvr.parse_record(rec, 1000)
    assert p["loss"] == {1: 9.0, 5: 8.0, 10: 7.5, 15: 7.0, 20: 6.5} and p["loop_step"] == 12
    assert p["prequant"] == dict(val_loss=6.12345678, val_bpb=3.21) and p["time_s"][5] == pytest.approx(0.04)
    sp = bvr.interval_speeds(p["time_s"], p["loop_step"], 1000)
    assert sp["off"]["n_intervals"] == 1 and sp["off"]["ms_step"] == pytest.approx(8.0)  # (0.08 - 0.04) s / 5 steps
    assert sp["on"]["n_intervals"] == 1 and sp["on"]["ms_step"] == pytest.approx(20.0)  # 10->15 holds the switch: dropped
    ours = "\n".join(["event:env torch:2 attention:fa4 mlp_kernel:triton device:H200", "event:train step:1 loss:9.1 ms_step:5 elapsed_s:0.5",
                      "event:layer_loop enabled:1 step:1 frac:0.5", "event:train step:2 loss:8.9 ms_step:5 elapsed_s:1.0",
                      "event:prequant val_loss:6.5 val_bpb:3.3 eval_s:1"])
    o = bvr.parse_ours(ours)
    assert o["loss"] == {1: 9.1, 2: 8.9} and o["loop_step"] == 1 and o["prequant"]["val_bpb"] == 3.3
    assert o["env"] == dict(attention="fa4", mlp_kernel="triton", device="H200")


def test_harness_runs_ours_on_cpu(tmp_path):
    """The whole harness with ours only (the record scripts need CUDA): two seeds of a tiny config, parsed losses and
    pre-quant numbers, the JSON/markdown outputs and the stop after event:prequant."""
    src = _source(tmp_path, n_train=40_000)
    data = tmp_path / "prepared"
    out = tmp_path / "out"
    tiny = ["VOCAB_SIZE=1024", "NUM_LAYERS=2", "MODEL_DIM=32", "NUM_HEADS=2", "NUM_KV_HEADS=1", "ROPE_DIMS=8", "NUM_LOOPS=1",
            "LOOP_START=0", "LOOP_END=0", "PARALLEL_START_LAYER=1", "COMPILE=0", "GRAD_ACCUM_STEPS=0"]
    bench = ROOT / "bench" / "bench_vs_record.py"
    base = [sys.executable, str(bench), "--data", str(data), "--source", str(src), "--tokenizer", str(SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model")]
    if not (SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model").exists():
        pytest.skip("../shared/data/tokenizers is absent (a SentencePiece model for the val_bpb byte tables)")
    subprocess.run(base + ["--prepare-only", "--loss-batch-tokens", "2048", "--seq-len", "64"], check=True, cwd=ROOT, timeout=60)
    cmd = base + ["--out", str(out), "--parts", "loss", "--which", "ours", "--seeds", "1,2", "--steps", "6", "--loss-batch-tokens", "2048",
                  "--seq-len", "64", "--warmup", "1", "--timeout", "150", "--parallel", "2"] + [f"--ours-set={s}" for s in tiny]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "bench_vs_record.json").read_text())
    runs = res["runs"]
    assert [(r["which"], r["seed"], r["status"]) for r in runs] == [("ours", 1, "ok"), ("ours", 2, "ok")]
    for r in runs:
        assert sorted(int(s) for s in r["loss"]) == list(range(1, 7)) and r["prequant"]["val_loss"] > 0 and r["loop_step"] == 3
    assert runs[0]["loss"]["1"] != runs[1]["loss"]["1"]  # different seeds, different init
    assert "ours vs pr1855_train_gpt.py" in (out / "bench_vs_record.md").read_text()
    assert "===== ours loss seed 2 (ok) =====" in (out / "bench_vs_record_runs.log").read_text()


def test_profile_windows_shift_by_ours_warmup_and_reject_bad_specs():
    assert bvr.profile_windows("8:11,40:43", 0) == "8:11,40:43"
    assert bvr.profile_windows("8:11", 4) == "12:15"
    for bad in ("8", "5:5", "a:b", "9:3"):
        with pytest.raises(SystemExit, match="--profile"):
            bvr.profile_windows(bad, 0)


def test_profile_hook_profiles_exactly_the_chosen_optimizer_steps(tmp_path):
    """bench/profile_hook as sitecustomize of an unmodified script: a window A:B covers the optimizer steps A+1..B of
    the first optimizer (a second optimizer does not advance the count), and nothing runs without PROFILE_STEPS."""
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "w, b = torch.nn.Parameter(torch.randn(32, 32)), torch.nn.Parameter(torch.zeros(32))\n"
        "o1, o2 = torch.optim.SGD([w], lr=0.01), torch.optim.Adam([b], lr=0.01)\n"
        "for i in range(7):\n"
        "    torch.mm(w, torch.ones(32, 32)).add(b).square().sum().backward()\n"
        "    o1.step(); o2.step(); o1.zero_grad(); o2.zero_grad()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "bench" / "profile_hook"), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "prof"
    subprocess.run([sys.executable, str(script)], check=True, timeout=120,
                   env=dict(env, PROFILE_STEPS="2:5", PROFILE_OUT=str(out), PROFILE_TAG="t"))
    d = json.loads((out / "t_2-5.json").read_text())
    calls = {k["name"]: k["calls_per_step"] for k in d["kernels"]}
    assert d["steps"] == 3 and d["device"] == "cpu" and d["device_ms_per_step"] > 0
    assert calls["aten::mm"] == 2  # forward + the weight gradient, once per step
    assert calls["Optimizer.step#SGD.step"] == 1 and calls["Optimizer.step#Adam.step"] == 1
    assert (out / "t_2-5.txt").read_text().strip()
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, env=dict(env, PROFILE_OUT=str(tmp_path / "none")))
    assert not (tmp_path / "none").exists()
