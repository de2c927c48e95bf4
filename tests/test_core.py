"""Core pipeline tests: config, data errors, val_bpb bytes, causality, artifact roundtrip, eval
coverage, the CPU smoke preset end to end, and 1-process vs 2-process (gloo) equality."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ROOT, SHARED

sys.path.insert(0, str(ROOT / "tools"))
import contract  # noqa: E402

TOK_DIR = SHARED / "data" / "tokenizers"
TINY = dict(VOCAB_SIZE="64", NUM_LAYERS="4", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="4",
            LOOP_START="1", LOOP_END="2", NUM_LOOPS="1", PARALLEL_START_LAYER="3", TRAIN_SEQ_LEN="32",
            TRAIN_BATCH_TOKENS="64", EVAL_SEQ_LEN="32", EVAL_STRIDE="8", COMPILE="0")


def tiny_cfg(**kw):
    env = dict(TINY)
    env.update({k: str(v) for k, v in kw.items()})
    return tg.Config.from_env(env)


# -- config ------------------------------------------------------------------------------------

def test_defaults_are_the_sota_family():
    cfg = tg.Config.from_env({})
    assert (cfg.num_layers, cfg.model_dim, cfg.n_heads, cfg.num_kv_heads, cfg.vocab_size) == (11, 512, 8, 4, 8192)
    assert cfg.tie_embeddings and cfg.train_seq_len == 2048 and cfg.train_batch_tokens == 786432
    assert cfg.max_wallclock_seconds == 600


def test_config_types_aliases_and_errors():
    cfg = tg.Config.from_env({"XSA_LAYERS": "4", "LOGIT_SOFTCAP": "0", "TIE_EMBEDDINGS": "false"})
    assert cfg.xsa_last_n == 4 and cfg.logit_softcap == 0 and not cfg.tie_embeddings
    with pytest.raises(tg.ConfigError, match="NUM_LAYERS"):
        tg.Config.from_env({"NUM_LAYERS": "eleven"})
    with pytest.raises(tg.ConfigError, match="COMPRESSOR"):
        tg.Config.from_env({"COMPRESSOR": "zip"})
    with pytest.raises(tg.ConfigError, match="XSA_LAST_N and XSA_LAYERS|XSA_LAYERS and XSA_LAST_N"):
        tg.Config.from_env({"XSA_LAYERS": "4", "XSA_LAST_N": "3"})
    with pytest.raises(tg.ConfigError, match="TRAIN_BATCH_TOKENS"):
        tg.Config.from_env({"TRAIN_BATCH_TOKENS": "1000"})


def test_unknown_knob_warns():
    warnings = []
    tg.Config.from_env({"MATRX_LR": "0.1", "MUON_WDD": "1", "HOME": "/root"}, warn=warnings.append)
    assert any("MATRX_LR" in w and "MATRIX_LR" in w for w in warnings)
    assert any("MUON_WDD" in w for w in warnings)
    assert not any("HOME" in w for w in warnings)


def test_every_field_has_a_group():
    groups = {"run", "model", "attention", "training", "optimizer", "quantization", "eval", "ttt", "systems"}
    assert all(f.group in groups for f in tg.FIELDS), [f.name for f in tg.FIELDS if f.group not in groups]
    assert len({f.name for f in tg.FIELDS}) == len(tg.FIELDS)


def test_readme_env_table_in_sync():
    readme = (ROOT / "README.md").read_text()
    assert tg.env_table_markdown() in readme, "README env table is stale: run `python tools/gen_env_table.py`"


# -- data --------------------------------------------------------------------------------------

def test_shard_roundtrip_and_header_errors(tmp_path):
    toks = np.arange(1000, dtype=np.uint16)
    p = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(p, toks)
    assert np.array_equal(tg.load_shard(p), toks)
    raw = bytearray(p.read_bytes())
    bad = tmp_path / "bad_magic.bin"
    bad.write_bytes(b"\x00\x00\x00\x00" + bytes(raw[4:]))
    with pytest.raises(tg.DataError, match="bad_magic.bin.*magic"):
        tg.load_shard(bad)
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(bytes(raw[:-10]))
    with pytest.raises(tg.DataError, match="trunc.bin.*2000 tokens|trunc.bin.*must be"):
        tg.load_shard(trunc)
    ver = bytearray(raw)
    ver[4:8] = (7).to_bytes(4, "little")
    (tmp_path / "ver.bin").write_bytes(bytes(ver))
    with pytest.raises(tg.DataError, match="version"):
        tg.load_shard(tmp_path / "ver.bin")
    with pytest.raises(tg.DataError, match="not found"):
        tg.load_shard(tmp_path / "missing.bin")
    with pytest.raises(tg.DataError, match="no fineweb_val_"):
        tg.shard_files(str(tmp_path), "val")


def test_distributed_loader_ranks_partition_the_global_chunk(tmp_path):
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5000) % 60000)
    files = [str(tmp_path / "fineweb_train_000000.bin")]
    dev = torch.device("cpu")
    one = tg.DistributedLoader(files, 0, 1, 64, 16, dev, prefetch=0)
    a = [one.next()[0] for _ in range(2)]
    r0 = tg.DistributedLoader(files, 0, 2, 64, 16, dev, prefetch=2)
    r1 = tg.DistributedLoader(files, 1, 2, 64, 16, dev, prefetch=0)
    x0, x1 = r0.next()[0], r1.next()[0]
    r0.close()
    # the 2-rank global chunk equals two consecutive 1-rank micro-batches
    assert torch.equal(torch.cat([x0, x1]), torch.cat(a))


# -- val_bpb byte accounting -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fineweb_1024_bpe.model", "fineweb_8192_bpe.model"])
def test_bpb_bytes_equal_utf8_length_of_normalized_text(name):
    path = TOK_DIR / name
    if not path.is_file():
        pytest.skip(f"shared tokenizer {path} absent (../shared not beside the repo)")
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(path))
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;!?'-\n\t") + ["é", "ß", "中", "文", "🙂", "ñ", "  "]
    for _ in range(40):
        text = "".join(rng.choice(alphabet, size=rng.integers(1, 200)))
        ids = [sp.bos_id()] + sp.encode(text)
        prev, tgt = np.array(ids[:-1]), np.array(ids[1:])
        got = int(tg.target_bytes(prev, tgt, luts).sum())
        # the reference: UTF-8 length of what the tokens decode to (the tokenizer-normalized text)
        assert got == len(sp.decode(ids[1:]).encode("utf-8")), text


def test_byte_fallback_counts_one_byte_and_control_zero():
    path = TOK_DIR / "fineweb_1024_bpe.model"
    if not path.is_file():
        pytest.skip("shared tokenizer absent (../shared not beside the repo)")
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(path))
    base, lead, boundary = tg.build_byte_luts(sp, sp.vocab_size())
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert byte_ids and all(base[i] == 1 for i in byte_ids)
    assert base[sp.bos_id()] == 0 and boundary[sp.bos_id()]


# -- model ------------------------------------------------------------------------------------

def test_causality_default_stack():
    torch.manual_seed(0)
    cfg = tiny_cfg(WINDOW_PATTERN="SL", WINDOW_SHORT=5, BIGRAM_HASH=1, VE_ENABLED=1, VALUE_RESIDUAL=1)
    model = tg.GPT(cfg).eval()
    model.looping_active = True
    for p in model.parameters():  # make zero-init gates and projections non-trivial
        p.data.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(2, 64, (2, 32))
    base = model.forward_logits(ids)
    for t in (5, 17, 31):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 7) % 64
        out = model.forward_logits(ids2)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5), f"position < {t} changed"
        assert not torch.allclose(out[:, t:], base[:, t:])


def quantized_tiny(**kw):
    """A tiny RTN-quantized model with non-trivial weights: (cfg, tensors, qmeta)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(QUANT="rtn", **kw)
    model = tg.GPT(cfg)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    return (cfg, *tg.quantize_model(model, cfg, {}))


def test_artifact_roundtrip_exact(tmp_path):
    cfg, tensors, qmeta = quantized_tiny()
    blob = tg.build_artifact(tensors, qmeta, cfg, 1)
    loaded, lcfg = tg.load_artifact(blob, torch.device("cpu"))
    expect = tg.dequantize_state_dict(tensors, qmeta)
    got = loaded.state_dict()
    assert set(got) == set(expect)
    for k in expect:
        assert torch.equal(got[k], expect[k].to(got[k].dtype)), k
    # same bytes -> same model; serialization is deterministic
    assert tg.build_artifact(*quantized_tiny()[1:], cfg, 1) == blob
    assert lcfg.to_dict()["NUM_LAYERS"] == cfg.num_layers


def test_artifact_rejects_garbage():
    with pytest.raises(ValueError):
        tg.load_artifact(b"not an artifact at all", torch.device("cpu"))


# -- evaluation coverage -------------------------------------------------------------------------

@pytest.mark.parametrize("n,L,stride", [(100, 16, 4), (101, 16, 16), (17, 16, 4), (10, 16, 4), (1000, 64, 7), (65, 64, 64)])
def test_sliding_windows_score_every_target_once(n, L, stride):
    wins = tg.eval_windows(n, L, stride)
    scored = []
    for s, k in wins:
        length = min(L, n - 1)
        assert 0 <= s and s + length <= n - 1 + (0 if length == L else 1)
        scored.extend(range(s + 1 + length - k, s + 1 + length))  # target token indices
    assert sorted(scored) == list(range(1, n)), "every target 1..N-1 exactly once"


def test_stride_equal_seq_len_is_plain_eval():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = tg.GPT(cfg).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    toks = torch.randint(0, 64, (200,))
    luts = tg.LUTs((np.ones(64, dtype=np.int64), np.zeros(64, dtype=bool), np.zeros(64, dtype=bool)), torch.device("cpu"))
    a = tg.evaluate(model, model, toks, 32, 32, 4, luts, torch.device("cpu"), 0, 1)
    # direct non-overlapping reference over full windows + a last full-context window for the tail
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, 199, 32):
            e = min(s + 32, 199)
            st = max(0, e - 32)
            nll = model(toks[st:e][None], toks[st + 1:e + 1][None], None, "none")[0]
            total += nll[s - st:].double().sum().item()
            n += e - s
    assert a[2] == 199 and n == 199
    assert a[0] == pytest.approx(total / n, rel=1e-9, abs=1e-9)


# -- end to end ------------------------------------------------------------------------------

def run_train(tmp, env, nproc=1, args=()):
    full = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, str(ROOT / "train_gpt.py"), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "train_gpt.py"), *args]
    return subprocess.run(cmd, cwd=tmp, env=full, capture_output=True, text=True, timeout=600)


def events(text, name):
    """The event:<name> lines of a run's output, as {key: str} dicts (tools/contract.py)."""
    return contract.parse_events(text, strict=True).get(name, [])


def test_smoke_preset_whole_pipeline(tmp_path):
    r = run_train(tmp_path, dict(PRESET="smoke", RUN_ID="smoke1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for ev in ("config", "data", "warmup", "train", "stop", "gptq", "prequant", "artifact", "roundtrip", "sliding", "final", "summary"):
        assert events(r.stdout, ev), f"missing event:{ev}"
    run_dir = tmp_path / "runs" / "smoke1"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["bytes_total"] == s["bytes_model"] + s["bytes_code"] and s["size_ok"]
    assert s["bytes_model"] == (run_dir / "final_model.ptz").stat().st_size
    assert (run_dir / "train_gpt.py").read_bytes() == (ROOT / "train_gpt.py").read_bytes()
    # the quantization gap from the plain roundtrip (the n-gram tilt, on by default, moves quant_val_bpb itself)
    assert abs(s["quant_plain_val_bpb"] - s["prequant_val_bpb"]) < 0.1 and s["final_metric"] == "sliding"
    assert s["quant_val_bpb"] < s["quant_plain_val_bpb"], "the default n-gram tilt should help on the repetitive smoke text"
    assert (run_dir / "train.log").read_text().count("event:") >= 10
    # a second run never overwrites the first
    r2 = run_train(tmp_path, dict(PRESET="smoke", RUN_ID="smoke1"))
    assert r2.returncode != 0 and "already holds a run" in r2.stderr
    # the artifact evaluates alone in a fresh process and gives the same roundtrip score
    r3 = run_train(tmp_path, dict(PRESET="smoke", RUN_ID="eval1", SLIDING_EVAL="0"), args=("--eval-only", str(run_dir / "final_model.ptz")))
    assert r3.returncode == 0, r3.stderr[-2000:]
    s3 = json.loads((tmp_path / "runs" / "eval1" / "summary.json").read_text())
    assert s3["quant_val_bpb"] == pytest.approx(s["quant_val_bpb"], abs=1e-9)


def test_missing_data_gives_clear_error(tmp_path):
    r = run_train(tmp_path, dict(DATA_PATH=str(tmp_path / "nope"), TOKENIZER_PATH=str(tmp_path / "nope.model"), RUN_ID="x", COMPILE="0"))
    assert r.returncode != 0
    assert "TOKENIZER_PATH" in r.stderr and "Traceback" not in r.stderr


def test_ddp_two_processes_match_one(tmp_path):
    base = dict(PRESET="smoke", ITERATIONS="3", TRAIN_LOG_EVERY="1", WARMUP_STEPS="0", SLIDING_EVAL="0", EMA_ENABLED="0",
                GPTQ_CALIBRATION_BATCHES="1", VAL_MAX_TOKENS="1024")
    r1 = run_train(tmp_path, dict(base, RUN_ID="one", GRAD_ACCUM_STEPS="2"))
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run_train(tmp_path, dict(base, RUN_ID="two", GRAD_ACCUM_STEPS="1"), nproc=2)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    l1 = [float(e["loss"]) for e in events(r1.stdout, "train")]
    l2 = [float(e["loss"]) for e in events(r2.stdout, "train")]
    assert len(l1) == len(l2) == 3
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)


def test_gated_skip_gradients():
    torch.manual_seed(0)
    args = [torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    args += [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(tg.GatedSkip.apply, args)
    x, s, w, g = args
    ref = torch.sigmoid(g) * x + (1 - torch.sigmoid(g)) * (w * s)
    assert torch.equal(tg.GatedSkip.apply(*args), ref)


def test_channel_scale_gradients_and_forward():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tg.ChannelScale.apply, [t, s])
    assert torch.equal(tg.ChannelScale.apply(t, s), s * t)
    lam = torch.randn(1, dtype=torch.float64, requires_grad=True)  # scalar scale (SmearGate lambda)
    assert torch.autograd.gradcheck(tg.ChannelScale.apply, [t, lam])
    # mixed dtypes as in the model: bf16 branch output times an fp32 scale -> fp32, grads in each input's dtype
    tb = torch.randn(4, 7, 8).bfloat16().requires_grad_()
    sf = torch.randn(8, requires_grad=True)
    out = tg.ChannelScale.apply(tb, sf)
    assert out.dtype == torch.float32 and torch.equal(out, sf * tb)
    g = torch.randn_like(out)
    out.backward(g)
    tb2, sf2 = tb.detach().clone().requires_grad_(), sf.detach().clone().requires_grad_()
    (sf2 * tb2).backward(g)
    assert tb.grad.dtype == torch.bfloat16 and torch.equal(tb.grad, tb2.grad)
    assert torch.allclose(sf.grad, sf2.grad, rtol=1e-5, atol=1e-5)


def test_lane_mix_gradients():
    torch.manual_seed(0)
    args = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    args += [torch.randn(2, dtype=torch.float64, requires_grad=True), torch.randn(2, 2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(tg.LaneMix.apply, args)


@pytest.mark.parametrize("kw", [dict(), dict(SKIP_GATES_ENABLED=0), dict(PARALLEL_START_LAYER=0, SMEAR_GATE=1, SMEAR_GATE_MODE="v2")])
def test_fused_grads_off_gives_the_same_loss_and_gradients(kw):
    """FUSED_GRADS=0 runs the plain expressions (scale, skip_mix, lane_mix) under autograd: the same forward and,
    up to summation order, the same gradient for every parameter as the custom backwards."""
    ids = torch.randint(2, 64, (2, 32), generator=torch.Generator().manual_seed(4))
    out = {}
    for fused in (1, 0):
        torch.manual_seed(0)
        model = tg.GPT(tiny_cfg(**{**dict(NUM_LAYERS=6, LOOP_START=2, LOOP_END=3, NUM_LOOPS=1, PARALLEL_START_LAYER=4), **kw}, FUSED_GRADS=fused))
        assert model.kernels.scale is (tg.fused_scale if fused else tg.scale)
        with torch.no_grad():  # non-trivial skip weights / gates / lane lambdas
            for n, p in model.named_parameters():
                if p.ndim <= 2 and "emb" not in n:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        model.looping_active = True
        loss = model(ids, ids)
        loss.backward()
        out[fused] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys()
    for n, g in out[1][1].items():
        torch.testing.assert_close(out[0][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_nan_loss_aborts_with_clear_error(tmp_path):
    cfg = tg.Config.from_env(dict(TINY, GRAD_ACCUM_STEPS="1", ITERATIONS="5", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0", TRAIN_LOG_EVERY="100"))
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(4000) % 64)
    model = tg.GPT(cfg)
    with torch.no_grad():
        model.tok_emb.weight[3] = float("nan")  # any batch containing token 3 gives a NaN loss
    trainer = tg.Trainer(cfg, model, torch.device("cpu"), 0, 1, [str(tmp_path / "fineweb_train_000000.bin")], tg.Logger(None, 0))
    with pytest.raises(tg.TrainingError, match="NaN"):
        trainer.train(None)


@pytest.mark.parametrize("looping", [False, True])
def test_default_stack_traces_as_one_graph(looping):
    """A graph break splits the compiled step and blocks fusion (it cost ~25% of the step on H100 when the
    same tensor reached GatedSkip/LaneMix twice). Dynamo's explain runs on the CPU, no inductor needed."""
    assert_default_stack_is_one_graph(looping)


def assert_default_stack_is_one_graph(looping: bool):
    torch._dynamo.reset()
    cfg = tiny_cfg(NUM_LAYERS=6, LOOP_START=2, LOOP_END=3, NUM_LOOPS=2, PARALLEL_START_LAYER=4)
    model = tg.GPT(cfg)
    model.looping_active = looping
    ids = torch.randint(2, 64, (2, 32))
    explanation = torch._dynamo.explain(model)(ids, ids, tg.resolve_kernels(cfg, "cpu").masks(ids, 1))
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    assert explanation.graph_count == 1
