"""Switches that make the seeds' rows run as their authors ran them (issue 16): SmearGate v2 after the norm (#1969),
GPT-J single-lane parallel blocks (#1493/#1774), a fixed / absent query gain (autoresearch), the seeds' compressor
settings, which storage each gate tensor gets, SHD's artifact saving and the time-based WARMDOWN_ITERS schedule.
Each: the math against a plain reference, and the switch off = today's behaviour."""
from __future__ import annotations

import lzma
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from feature_ref import BOS, build, make_cfg, perturb, token_ids


def rms(x):
    return F.rms_norm(x, (x.size(-1),))


@pytest.mark.parametrize("where", ["before", "after"])
def test_smear_v2_placement(where):
    """before: x = norm(e + l*sig(w e[:W]) e_prev) (#1667/#1855); after: x = n + l*sig(w n[:W]) n_prev, n = norm(e) (#1969)."""
    _, m = build(SMEAR_GATE=1, SMEAR_GATE_MODE="v2", SMEAR_GATE_WIDTH=6, SMEAR_GATE_NORM=where, SMEAR_BOS_FIX=1)
    perturb(m)
    ids = token_ids(T=12, bos_positions=(0, 5))
    e = m.tok_emb(ids)

    def smear(x):
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        term = m.smear_lambda * torch.sigmoid(x[..., :6] @ m.smear_w.t()) * prev
        return x + term * (ids != BOS).unsqueeze(-1)

    ref = rms(smear(e)) if where == "before" else smear(rms(e))
    torch.testing.assert_close(m.embed(ids), ref)


def test_smear_v2_default_placement_is_before_the_norm():
    assert make_cfg().smear_gate_norm == "before"


def test_gptj_parallel_block_matches_its_formula_and_has_no_lane_parameters():
    cfg, m = build(PARALLEL_START_LAYER=2, PARALLEL_MODE="gptj")
    assert not hasattr(m, "parallel_resid_lambdas") and not hasattr(m, "parallel_post_lambdas")
    perturb(m)
    blk = m.blocks[3]
    x, x0 = torch.randn(2, 8, cfg.model_dim), torch.randn(2, 8, cfg.model_dim)
    ctx = {"ids": token_ids(T=8), "masks": None, "lora": None, "vi": 3}
    x_in = blk.resid_mix[0] * x + blk.resid_mix[1] * x0
    h = rms(x_in) * blk.s_in
    ref = x_in + blk.attn_scale * blk.s_out * blk.attn(h, x_in, ctx) + blk.mlp_scale * blk.s_out * blk.mlp(h)
    torch.testing.assert_close(blk.forward_gptj(x, x0, ctx), ref)
    # the model runs layers >= PARALLEL_START_LAYER through it (encoder layers too) and the others sequentially
    calls = []
    for i, b in enumerate(m.blocks):
        b.forward_gptj = (lambda f, i: lambda *a: calls.append(i) or f(*a))(b.forward_gptj, i)
    m.forward_logits(token_ids(T=8))
    assert calls == [2, 3]


def test_lanes_mode_is_unchanged_by_the_switch():
    ids = token_ids(T=12)
    _, a = build(PARALLEL_START_LAYER=2)
    _, b = build(PARALLEL_START_LAYER=2, PARALLEL_MODE="lanes")
    perturb(a), perturb(b)
    torch.testing.assert_close(a.forward_logits(ids), b.forward_logits(ids), rtol=0, atol=0)


def test_fixed_query_gain_is_a_buffer_and_one_means_no_gain():
    _, learned = build(QK_GAIN_INIT=1.0)
    _, fixed = build(QK_GAIN_INIT=1.0, QK_GAIN_LEARNED=0)
    assert "blocks.0.attn.q_gain" in dict(learned.named_parameters())
    assert "blocks.0.attn.q_gain" not in dict(fixed.named_parameters()) and "blocks.0.attn.q_gain" not in fixed.state_dict()
    assert all(r[0] != "scalar" or "q_gain" not in n for n, r in tg.param_roles(fixed).items())
    fixed.load_state_dict(learned.state_dict(), strict=False)  # same weights; the learned gain sits at 1.0
    ids = token_ids(T=12)
    torch.testing.assert_close(fixed.forward_logits(ids), learned.forward_logits(ids))
    _, gain3 = build(QK_GAIN_INIT=3.0, QK_GAIN_LEARNED=0)
    assert torch.all(gain3.blocks[1].attn.q_gain == 3.0)


def test_compressor_settings_reach_the_codecs_and_decode():
    raw = bytes(range(256)) * 300 + b"x" * 5000
    for kw in (dict(lgwin=22), dict(lgwin=24)):
        blob = tg.compress_blob(raw, "brotli", 2, **kw)
        assert tg.decompress_blob(blob) == raw
    six, nine = (tg.compress_blob(raw, "lzma", 0, lzma_preset=p) for p in (6, 9 | lzma.PRESET_EXTREME))
    assert tg.decompress_blob(six) == raw == tg.decompress_blob(nine)
    assert lzma.decompress(six[4:]) == raw  # preset 6 is the stream lzma.compress(preset=6) writes
    assert six[4:] == lzma.compress(raw, format=lzma.FORMAT_XZ, preset=6)
    with pytest.raises(tg.ConfigError, match="BROTLI_LGWIN"):
        make_cfg(BROTLI_LGWIN=25)
    cfg = make_cfg(COMPRESSOR="lzma", LZMA_PRESET=6, LZMA_EXTREME=0)
    tensors = {"w": torch.arange(1000, dtype=torch.int8).reshape(10, 100)}
    art = tg.build_artifact(tensors, {"tensors": {}}, cfg, BOS)
    assert tg.deserialize_state(art)[0]["w"].equal(tensors["w"])


@pytest.mark.parametrize("int8", [1, 0])
def test_storage_class_of_every_gate_tensor(int8):
    """GATE_QUANT_INT8=1: small gate matrices as per-row int8; 0: fp16 like every tensor of <= 65,536 elements
    (#487 / #1969). Gate biases are controls (fp16) either way."""
    for gate, names in (("gated", ("attn_gate.weight",)), ("out", ("attn_out_gate_w",)), ("sparse", ("attn_gate_w",))):
        cfg, m = build(GATED_ATTENTION=None, ATTN_OUT_GATE=None, SPARSE_ATTN_GATE=None, ATTN_GATE=gate, GATE_WIDTH=6,
                       GATE_QUANT_INT8=int8)
        plan = tg.quant_plan(cfg, tg.param_roles(m))
        sd = m.state_dict()
        for n in names:
            t = sd[f"blocks.0.attn.{n}"]
            assert plan(f"blocks.0.attn.{n}", t) == (("int8_row",) if int8 and t.numel() >= 32 else ("fp16",)), (gate, n)
        if gate == "gated":
            assert plan("blocks.0.attn.attn_gate_bias", sd["blocks.0.attn.attn_gate_bias"]) == ("fp16",)


def test_shared_head_dims_make_the_artifact_smaller():
    """SHD bakes identical rows into every head's Q/K: the compressed bytes shrink (PR #1774 reports ~413 KB at full size)."""
    sizes = {}
    for shd in (0, 4):
        cfg = tg.Config.from_env(dict(PRESET="smoke", SHARED_HEAD_DIM=str(shd), ROPE_DIMS="8", MODEL_DIM="128", NUM_HEADS="4",
                                      NUM_KV_HEADS="4", QUANT="int8", COMPRESSOR="brotli"))
        torch.manual_seed(0)
        m = tg.GPT(cfg, 1)
        tg.bake_shared_heads(m)
        tensors, meta = tg.quantize_model(m, cfg, {})
        sizes[shd] = len(tg.build_artifact(tensors, tg.meta_for_storage(meta), cfg, 1))
    assert sizes[4] < sizes[0], sizes


def test_warmdown_iters_is_counted_in_time_under_a_wallclock_cap():
    """#1125: the last WARMDOWN_ITERS steps, converted to time by the measured step time when a wallclock cap is set,
    by step count without one; floored at MIN_LR."""
    cfg = make_cfg(WARMDOWN_ITERS=100, MAX_WALLCLOCK_SECONDS=60, MIN_LR=0.0)
    mul = lambda remaining_ms, step_ms=50.0: tg.lr_multiplier(cfg, 0.0, 0, step_ms, remaining_ms)  # noqa: E731
    assert mul(10_000) == 1.0 and mul(5_000) == 1.0  # 100 steps x 50 ms = 5 s of warmdown
    assert mul(2_500) == pytest.approx(0.5) and mul(0) == 0.0
    assert mul(2_500, step_ms=25.0) == 1.0  # faster steps: the same 100 steps are a shorter time
    steps = make_cfg(WARMDOWN_ITERS=100, MAX_WALLCLOCK_SECONDS=0, ITERATIONS=1000, MIN_LR=0.1)
    assert tg.lr_multiplier(steps, 0.0, 850, 0.0, 0.0) == 1.0
    assert tg.lr_multiplier(steps, 0.0, 950, 0.0, 0.0) == pytest.approx(0.5)
    assert tg.lr_multiplier(steps, 0.0, 999, 0.0, 0.0) == pytest.approx(0.1)  # floored


def test_proj_init_ortho_scaled():
    """PR #487: orthogonal output projections times 1/sqrt(2L); the default stays zero-init."""
    cfg, m = build(PROJ_INIT="ortho_scaled")
    for blk in m.blocks:
        for lin in (blk.attn.proj, blk.mlp.proj):
            w = lin.weight.double() * (2 * cfg.num_layers) ** 0.5
            gram = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
            torch.testing.assert_close(gram, torch.eye(gram.size(0), dtype=torch.float64), atol=1e-5, rtol=0)
    _, z = build()
    assert all(torch.count_nonzero(b.attn.proj.weight) == 0 and torch.count_nonzero(b.mlp.proj.weight) == 0 for b in z.blocks)


def test_muon_wd_linear_schedule_falls_to_zero_with_progress():
    cfg, m = build(MUON_WD=0.2, MUON_WD_SCHEDULE="linear")
    opts = tg.Optimizers(m, cfg)
    for progress, want in ((0.0, 0.2), (0.25, 0.15), (1.0, 0.0), (1.2, 0.0)):
        opts.step(1.0, 1, progress)
        assert all(g["weight_decay"] == pytest.approx(want) for g in opts.muon.param_groups), progress
    cfg, m = build(MUON_WD=0.2)  # constant: untouched
    opts = tg.Optimizers(m, cfg)
    opts.step(1.0, 1, 0.9)
    assert all(g["weight_decay"] == pytest.approx(0.2) for g in opts.muon.param_groups)


def test_fp16_tensors_pass_through_unquantized():
    """PR #487's production run keeps tok_emb and the last two c_k in fp16; a name that is not a parameter is an error."""
    cfg, m = build(NUM_LAYERS=4, FP16_TENSORS="tok_emb.weight, blocks.3.attn.c_k.weight")
    plan = tg.quant_plan(cfg, tg.param_roles(m))
    sd = m.state_dict()
    assert plan("tok_emb.weight", sd["tok_emb.weight"]) == ("fp16",)
    assert plan("blocks.3.attn.c_k.weight", sd["blocks.3.attn.c_k.weight"]) == ("fp16",)
    base = tg.quant_plan(make_cfg(NUM_LAYERS=4), tg.param_roles(m))
    assert base("tok_emb.weight", sd["tok_emb.weight"])[0] in ("gptq", "rtn")
    assert plan("blocks.2.attn.c_k.weight", sd["blocks.2.attn.c_k.weight"]) == base("blocks.2.attn.c_k.weight", sd["blocks.2.attn.c_k.weight"])
    with pytest.raises(tg.ConfigError, match="FP16_TENSORS: 'blocks.9.attn.c_k.weight' is not a parameter"):
        tg.quant_plan(make_cfg(NUM_LAYERS=4, FP16_TENSORS="blocks.9.attn.c_k.weight"), tg.param_roles(m))


def test_cosine_warmdown_shape():
    """PR #1125 row 40: the same warmdown span, LR = 0.5 (1 - cos(pi x)) of the linear x; floored at MIN_LR."""
    lin, cos = make_cfg(WARMDOWN_FRAC=0.5, MIN_LR=0.0), make_cfg(WARMDOWN_FRAC=0.5, MIN_LR=0.0, WARMDOWN_SHAPE="cosine")
    for frac in (0.2, 0.5, 0.6, 0.75, 0.9, 1.0):
        x = tg.lr_multiplier(lin, frac, 0, 0.0, 0.0)
        assert tg.lr_multiplier(cos, frac, 0, 0.0, 0.0) == pytest.approx(0.5 * (1 - math.cos(math.pi * x)))
    assert tg.lr_multiplier(cos, 0.75, 0, 0.0, 0.0) == pytest.approx(0.5)  # halfway, as linear
    assert tg.lr_multiplier(cos, 0.6, 0, 0.0, 0.0) > tg.lr_multiplier(lin, 0.6, 0, 0.0, 0.0)  # stays high longer


def _trainer(tmp_path, **kw):
    cfg = make_cfg(ITERATIONS=12, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=100, GRAD_ACCUM_STEPS=1, **kw)
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", torch.arange(6000).numpy() % 60 + 2)
    torch.manual_seed(0)
    model = tg.GPT(cfg, BOS)
    return tg.Trainer(cfg, model, torch.device("cpu"), 0, 1, [str(tmp_path / "fineweb_train_000000.bin")], tg.Logger(None, 0))


def test_swa_is_the_mean_of_the_sampled_weights(tmp_path):
    """PR #1125 row 8: every SWA_EVERY steps while the LR multiplier is below SWA_START_LR, the weights join a running mean."""
    tr = _trainer(tmp_path, SWA_ENABLED=1, SWA_EVERY=2, SWA_START_LR=0.5, EMA_ENABLED=0, WARMDOWN_FRAC=1.0)
    samples, seen = [], []
    orig = tr.swa.update

    def record():
        samples.append([p.detach().clone() for p in tr.model.parameters()])
        orig()
    tr.swa.update = record
    for step in range(12):
        lr_mul = tg.lr_multiplier(tr.cfg, step / 12, step, 0.0, 0.0)
        tr.step(step, lr_mul, step / 12)
        seen.append((step, lr_mul))
    want = [s for s, m in seen if m < 0.5 and s % 2 == 0]
    assert len(samples) == len(want) == tr.swa.samples > 1
    mean = [torch.stack(ps).mean(0) for ps in zip(*samples)]
    for a, b in zip(tr.swa.shadow, mean):
        torch.testing.assert_close(a, b)
    with pytest.raises(tg.ConfigError, match="SWA_ENABLED=1 and EMA_ENABLED=1"):
        make_cfg(SWA_ENABLED=1, EMA_ENABLED=1)


def test_late_start_ema_restarts_from_the_weights(tmp_path):
    """PR #1125 row 35: before EMA_START_FRAC the shadow is not updated; at it, it restarts from the live weights."""
    tr = _trainer(tmp_path, EMA_ENABLED=1, EMA_DECAY=0.9, EMA_START_FRAC=0.5)
    init = [s.clone() for s in tr.ema.shadow]
    for step in range(6):  # progress < 0.5: untouched
        tr.step(step, 1.0, step / 12)
    assert all(torch.equal(a, b) for a, b in zip(tr.ema.shadow, init))
    tr.step(6, 1.0, 0.5)  # restart: shadow = weights after this step
    assert all(torch.equal(s, p.detach().float()) for s, p in zip(tr.ema.shadow, tr.model.parameters()))
    before = [s.clone() for s in tr.ema.shadow]
    tr.step(7, 1.0, 7 / 12)  # then the usual lerp
    for s, b, p in zip(tr.ema.shadow, before, tr.model.parameters()):
        torch.testing.assert_close(s, 0.9 * b + 0.1 * p.detach().float())
