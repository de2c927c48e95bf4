"""The rows of seed 003 (PR #1125) that needed new switches (issue 16): XSA gating (#41), the baseline's int8 clip
percentile + zlib (#31), int6 QAT (#37), progressive layer growing (#38) and depth recurrence with per-loop LoRA (#39).
Each: the math against an independent reference (tests/feature_ref.py or plain torch here), and the switch off =
today's behaviour, bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import graph_counter
from feature_ref import BOS, V, build, make_cfg, perturb, ref_logits, token_ids


def _logits(model, ids):
    with torch.no_grad():
        return model.forward_logits(ids, tg.resolve_kernels(model.cfg, "cpu").masks(ids, BOS))


# -- #41 XSA gating ---------------------------------------------------------------------------------------------------

def test_xsa_gate_matches_reference_per_head():
    """y - sigmoid(a_h) (y.v^) v^ with one logit per query head (8 scalars per layer in the PR), on XSA layers only."""
    cfg, m = build(XSA_LAST_N=2, XSA_GATE=1, XSA_GATE_INIT=0.7, UNET_SKIPS=1)
    names = {n for n, _ in m.named_parameters() if n.endswith("xsa_gate")}
    assert names == {"blocks.2.attn.xsa_gate", "blocks.3.attn.xsa_gate"}
    assert torch.all(m.blocks[3].attn.xsa_gate == 0.7) and m.blocks[3].attn.xsa_gate.shape == (cfg.n_heads,)
    assert tg.param_roles(m)["blocks.3.attn.xsa_gate"] == ("scalar", "control")
    m = perturb(m.double(), scale=1.0)  # heads get different strengths
    ids = token_ids(seed=3)
    torch.testing.assert_close(_logits(m, ids), ref_logits(m, ids), rtol=2e-5, atol=2e-5)


def test_xsa_gate_limits_and_off_switch():
    """Gate logits -> +inf is plain XSA, -> -inf is no XSA; XSA_GATE=0 builds no gate and the same logits as before."""
    ids = token_ids(seed=4)
    _, plain = build(XSA_LAST_N=-1)
    _, none = build(XSA_LAST_N=0)
    _, gated = build(XSA_LAST_N=-1, XSA_GATE=1)
    for m in (plain, none, gated):
        perturb(m.double(), only={n for n, _ in plain.named_parameters()})
    gated.load_state_dict({**gated.state_dict(), **plain.state_dict()})
    for b in gated.blocks:
        b.attn.xsa_gate.data.fill_(60.0)
    torch.testing.assert_close(_logits(gated, ids), _logits(plain, ids))
    for b in gated.blocks:
        b.attn.xsa_gate.data.fill_(-60.0)
    none.load_state_dict(plain.state_dict())
    torch.testing.assert_close(_logits(gated, ids), _logits(none, ids))
    _, off = build(XSA_LAST_N=-1, XSA_GATE=0)
    assert not any("xsa_gate" in n for n, _ in off.named_parameters())
    perturb(off.double(), only={n for n, _ in plain.named_parameters()})
    assert torch.equal(_logits(off, ids), _logits(plain, ids))
    with pytest.raises(tg.ConfigError, match="XSA_GATE=1 with XSA_LAST_N=0"):
        make_cfg(XSA_GATE=1, XSA_LAST_N=0)


# -- #31 int8 clip percentile + zlib -----------------------------------------------------------------------------------

def test_row_percentile_is_torch_quantile():
    a = torch.randn(7, 301).abs()
    for p in (0.0, 12.5, 50.0, 99.5, 99.99984, 100.0):
        torch.testing.assert_close(tg.row_percentile(a, p), torch.quantile(a, p / 100, dim=1), rtol=0, atol=1e-7)


def test_int8_clip_percentile_is_the_baseline_quantizer():
    """Per row: clip = percentile of |w|, w clamped to +-clip, scale = max(clip/127, floor) (fp16), q = round(w/scale)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 400, generator=g) * 0.05
    W[3, 7] = 2.0  # an outlier the clip removes
    for pct, floor in ((99.5, 0.0), (99.99984, 1 / 127), (100.0, 1 / 127)):
        q, s = tg.quantize_int8_rows(W, pct, floor)
        clip = torch.quantile(W.abs(), pct / 100, dim=1)
        want_s = torch.clamp(clip / 127, min=floor).to(torch.float16)
        assert torch.equal(s, want_s)
        want_q = torch.clamp(torch.round(torch.clamp(W, -clip[:, None], clip[:, None]) / want_s.float()[:, None]), -127, 127)
        assert torch.equal(q, want_q.to(torch.int8))
    q, s = tg.quantize_int8_rows(W, 99.5)
    assert q[3, 7] == 127 and float(s[3]) < 2.0 / 127  # the outlier no longer sets row 3's scale
    for off in (100.0, 0.0):  # absmax: today's quantizer, bit for bit
        a, b = tg.quantize_int8_rows(W, off, 0.0), tg.quantize_absmax_rows(W, 8)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_int8_clip_reaches_the_plan_and_artifact_only_when_set():
    cfg, m = build(QUANT="int8", MODEL_DIM=128, NUM_HEADS=4, MLP_MULT=8)  # mlp.fc 1024 x 128: quantized (> 65,536)
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    name = "blocks.0.mlp.fc.weight"
    assert sd[name].numel() > 65536
    plain = tg.quant_plan(cfg, tg.param_roles(m))
    assert plain(name, sd[name]) == ("int8_row",)
    clip_cfg = make_cfg(QUANT="int8", MODEL_DIM=128, NUM_HEADS=4, MLP_MULT=8, INT8_CLIP_PERCENTILE=99.5, INT8_SCALE_FLOOR=1 / 127)
    plan = tg.quant_plan(clip_cfg, tg.param_roles(m))
    assert plan(name, sd[name]) == ("int8_row", 99.5, 1 / 127)
    tensors, meta = tg.quantize_state_dict(sd, {}, plan)
    q, s = tg.quantize_int8_rows(sd[name].float(), 99.5, 1 / 127)
    assert torch.equal(tensors[name + ".q"], q) and torch.equal(tensors[name + ".scale"], s)
    back = tg.dequantize_state_dict(tensors, tg.meta_for_storage(meta))
    torch.testing.assert_close(back[name], tg.dequantize(q, s))
    for bad in (dict(INT8_CLIP_PERCENTILE=99.5), dict(INT8_SCALE_FLOOR=0.01)):
        with pytest.raises(tg.ConfigError, match="set QUANT=int8"):
            make_cfg(QUANT="rtn", **bad)
    with pytest.raises(tg.ConfigError, match="INT8_CLIP_PERCENTILE=101"):
        make_cfg(QUANT="int8", INT8_CLIP_PERCENTILE=101)


def test_zlib_codec_round_trips_and_is_bounded():
    import zlib
    raw = bytes(range(256)) * 300 + b"x" * 5000
    blob = tg.compress_blob(raw, "zlib", 0)
    assert blob[:4] == b"PGZD" and blob[4:] == zlib.compress(raw, 9) and tg.decompress_blob(blob) == raw
    assert tg.decompress_blob(tg.compress_blob(raw, "zlib", 2)) == raw
    with pytest.raises(ValueError, match="truncated"):
        tg.decompress_blob(blob[:-20])
    bomb = tg.compress_blob(b"\0" * (20 << 20), "zlib", 0)
    with pytest.raises(ValueError, match="expands beyond"):
        tg.decompress_blob(bomb)
    with pytest.raises(ValueError, match="corrupt zlib"):
        tg.decompress_blob(b"PGZD" + b"not a zlib stream")
    cfg = make_cfg(QUANT="int8", COMPRESSOR="zlib", INT8_CLIP_PERCENTILE=99.99984)
    tensors = {"w": torch.arange(1000, dtype=torch.int8).reshape(10, 100)}
    art = tg.build_artifact(tensors, {"tensors": {}}, cfg, BOS)
    assert art[:4] == b"PGZD" and tg.deserialize_state(art)[0]["w"].equal(tensors["w"])


# -- #37 QAT -----------------------------------------------------------------------------------------------------------

QAT_SHAPE = dict(MODEL_DIM=128, NUM_HEADS=4, MLP_MULT=8)  # mlp.fc / mlp.proj 1024 x 128: quantized (> 65,536 elements)


@pytest.mark.parametrize("quant", [dict(QUANT="gptq", MATRIX_BITS=6), dict(QUANT="rtn", MATRIX_BITS=5),
                                   dict(QUANT="int8", INT8_CLIP_PERCENTILE=99.5, INT8_SCALE_FLOOR=1 / 127)])
def test_qat_uses_the_artifact_round_trip_with_a_straight_through_gradient(quant):
    cfg, m = build(QAT=1, **QAT_SHAPE, **quant)
    perturb(m, scale=0.05)
    qat = {n for n, mod in m.named_modules() if isinstance(mod, tg.CastedLinear) and mod.qat is not None}
    assert qat == {f"blocks.{i}.mlp.{w}" for i in range(cfg.num_layers) for w in ("fc", "proj")}
    assert tg.set_qat(m, True) == len(qat)
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    plan = tg.quant_plan(cfg, tg.param_roles(m))
    rtn_plan = lambda n, t: ("rtn", *plan(n, t)[1:]) if plan(n, t)[0] == "gptq" else plan(n, t)  # noqa: E731  GPTQ's grid, RTN
    tensors, meta = tg.quantize_state_dict(sd, {}, rtn_plan)
    art = tg.dequantize_state_dict(tensors, tg.meta_for_storage(meta))
    for n in qat:
        assert torch.equal(m.get_submodule(n).effective_weight(), art[n + ".weight"]), n
    # straight-through: the gradient reaching W is the gradient at the quantized weights, unchanged
    ids = token_ids(seed=5)
    tgt = torch.roll(ids, -1, 1)
    m(ids, tgt).backward()
    _, ref = build(**QAT_SHAPE)
    ref.load_state_dict({**sd, **{n + ".weight": art[n + ".weight"] for n in qat}})
    ref(ids, tgt).backward()
    for n in qat:
        torch.testing.assert_close(m.get_submodule(n).weight.grad, ref.get_submodule(n).weight.grad, rtol=1e-5, atol=1e-7)


def test_qat_before_its_start_is_bit_identical_and_stores_nothing():
    ids = token_ids(seed=6)
    _, off = build(**QAT_SHAPE)
    _, on = build(QAT=1, QAT_START_FRAC=0.5, **QAT_SHAPE)
    perturb(off), perturb(on)
    assert set(off.state_dict()) == set(on.state_dict())  # the mix buffers are not persistent (nor in the artifact)
    assert not any(isinstance(mod, tg.CastedLinear) and mod.qat is not None for mod in off.modules())
    assert torch.equal(_logits(on, ids), _logits(off, ids))
    tg.set_qat(on, True)
    assert not torch.equal(_logits(on, ids), _logits(off, ids))
    tg.set_qat(on, False)
    assert torch.equal(_logits(on, ids), _logits(off, ids))
    with pytest.raises(tg.ConfigError, match="QAT_START_FRAC=1.0"):
        make_cfg(QAT=1, QAT_START_FRAC=1.0)


def test_qat_switch_does_not_recompile():
    """The switch is a buffer value: the compiled graph (dynamo guards, seen through a counting backend) stays valid."""
    import torch._dynamo
    cfg, m = build(QAT=1, **QAT_SHAPE)
    perturb(m, scale=0.05)
    counting, graphs = graph_counter()

    torch._dynamo.reset()
    try:
        fwd = torch.compile(m, dynamic=False, backend=counting)
        ids = token_ids(seed=7)
        with torch.no_grad():
            before = fwd(ids, torch.roll(ids, -1, 1))
            tg.set_qat(m, True)
            after = fwd(ids, torch.roll(ids, -1, 1))
        assert len(graphs) == 1, f"{len(graphs)} graphs: switching QAT on recompiled"
        assert not torch.equal(before, after)
    finally:
        torch._dynamo.reset()


def _trainer(tmp_path, events, **kw):
    cfg = make_cfg(ITERATIONS=8, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=100, GRAD_ACCUM_STEPS=1, **kw)
    shard = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(shard, torch.arange(6000).numpy() % 60 + 2)
    torch.manual_seed(0)
    model = tg.GPT(cfg, BOS)
    tr = tg.Trainer(cfg, model, torch.device("cpu"), 0, 1, [str(shard)], tg.Logger(None, 0))
    tr.log = lambda ev, **kv: events.append((ev, kv))
    return tr


def test_qat_switches_on_at_its_fraction_and_logs_it(tmp_path):
    events = []
    tr = _trainer(tmp_path, events, QAT=1, QAT_START_FRAC=0.5, QUANT="rtn", MATRIX_BITS=6, **QAT_SHAPE)
    seen = []
    orig = tr.step
    tr.step = lambda step, *a: seen.append((step, float(tr.model.blocks[0].mlp.fc.qat_mix))) or orig(step, *a)
    tr.train(None)
    qat = [kv for ev, kv in events if ev == "qat"]
    assert len(qat) == 1 and qat[0]["step"] == 4 and qat[0]["weights"] == 8 and qat[0]["bits"] == 6
    assert seen == [(s, float(s >= 4)) for s in range(8)]


# -- #38 progressive layer growing -------------------------------------------------------------------------------------

def test_grow_small_model_matches_reference_and_off_is_unchanged():
    ids = token_ids(seed=8)
    cfg, m = build(NUM_LAYERS=5, GROW_LAYERS_FROM=2, UNET_SKIPS=1, XSA_LAST_N=2)
    assert m.skip_weights.shape[0] == 2  # sized for the larger of the small (1) and full (2) U-Nets
    perturb(m.double())
    for grown in (False, True):
        m.grown = grown
        assert tg.layer_order(cfg, False, grown) == (list(range(5)) if grown else [0, 1])
        torch.testing.assert_close(_logits(m, ids), ref_logits(m, ids), rtol=2e-5, atol=2e-5)
    _, off = build(NUM_LAYERS=5, UNET_SKIPS=1, XSA_LAST_N=2)
    perturb(off.double())
    assert torch.equal(_logits(off, ids), _logits(m, ids))  # grown = the plain model
    for bad, msg in ((dict(GROW_LAYERS_FROM=5), "GROW_LAYERS_FROM=5"), (dict(GROW_LAYERS_FROM=2, GROW_AT_FRAC=1.0), "GROW_AT_FRAC"),
                     (dict(GROW_LAYERS_FROM=2, NUM_LOOPS=1, LOOP_START=0, LOOP_END=1), "do not combine")):
        with pytest.raises(tg.ConfigError, match=msg):
            make_cfg(NUM_LAYERS=5, **bad)


def test_grow_copies_weights_optimizer_state_and_ema(tmp_path):
    """Before GROW_AT_FRAC only the first N blocks train (the rest stay at init, without optimizer state); at it, block
    i takes block i*N//L's weights, Muon/AdamW state and EMA shadow; then every block trains. event:grow says so."""
    events = []
    tr = _trainer(tmp_path, events, NUM_LAYERS=5, GROW_LAYERS_FROM=2, GROW_AT_FRAC=0.5, EMA_ENABLED=1, EMA_DECAY=0.9, UNET_SKIPS=1)
    m, L = tr.model, 5
    assert not m.grown
    init = {n: p.detach().clone() for n, p in m.named_parameters()}
    snap = {}
    orig = tr.step

    def step(s, *a):
        out = orig(s, *a)
        if s == 3:  # the last small step: remember the small model, its optimizer state and EMA
            assert all(torch.equal(p, init[n]) for n, p in m.named_parameters() if n.startswith(("blocks.2.", "blocks.3.", "blocks.4.")))
            assert not any(p in o.state for o in tr.opts.opts for p in m.blocks[2].parameters())
            idx = {id(p): k for k, p in enumerate(m.parameters())}
            for n, p in m.named_parameters():
                st = {o: {k: v.clone() for k, v in o.state[p].items()} for o in tr.opts.opts if p in o.state}
                snap[n] = (p.detach().clone(), st, tr.ema.shadow[idx[id(p)]].clone())
        return out
    grown_at = {}
    real_grow = tg.grow_layers

    def spy(model, opts, avgs):
        src = real_grow(model, opts, avgs)
        idx = {id(p): k for k, p in enumerate(model.parameters())}
        for i, j in enumerate(src):
            for n, p in model.blocks[i].named_parameters():
                w, st, sh = snap[f"blocks.{j}.{n}"]
                assert torch.equal(p, w) and torch.equal(tr.ema.shadow[idx[id(p)]], sh), (i, n)
                for o in tr.opts.opts:
                    assert (p in o.state) == (o in st)
                    if p in o.state:
                        assert all(torch.equal(o.state[p][k], v) for k, v in st[o].items()), (i, n)
        grown_at["src"] = src
        return src
    tr.step = step
    tg.grow_layers = spy
    try:
        tr.train(None)
    finally:
        tg.grow_layers = real_grow
    assert grown_at["src"] == [i * 2 // L for i in range(L)] == [0, 0, 0, 1, 1]
    grow = [kv for ev, kv in events if ev == "grow"]
    assert len(grow) == 1 and grow[0]["step"] == 4 and grow[0]["source"] == "0,0,0,1,1" and m.grown
    assert all(not torch.equal(p, init[n]) for n, p in m.named_parameters() if ".attn.c_q" in n or ".mlp.fc" in n)


# -- #39 depth recurrence + per-loop LoRA ------------------------------------------------------------------------------

LOOP = dict(NUM_LOOPS=2, LOOP_START=1, LOOP_END=2, UNET_SKIPS=1)


def test_loop_lora_matches_reference_per_pass():
    cfg, m = build(LOOP_LORA_RANK=3, **LOOP)
    lora = {n: p for n, p in m.named_parameters() if ".loop_" in n}
    assert {n.split(".")[1] for n in lora} == {"1", "2"} and len(lora) == 2 * 6 * 2
    a, b = m.blocks[1].mlp.fc.loop_a, m.blocks[1].mlp.fc.loop_b
    assert a.shape == (3, 3, cfg.model_dim) and b.shape == (3, 64, 3) and not b.any()
    assert all(tg.param_roles(m)[n] == ("scalar", "control") for n in lora)
    plan = tg.quant_plan(cfg, tg.param_roles(m))
    assert all(plan(n, p) == ("fp16",) for n, p in lora.items())
    perturb(m.double())  # B != 0: every pass differs
    ids = token_ids(seed=9)
    for looping in (False, True):
        m.looping_active = looping
        torch.testing.assert_close(_logits(m, ids), ref_logits(m, ids), rtol=2e-5, atol=2e-5)
    # passes really differ: the same model with every pass's delta set to pass 0's gives other logits
    with torch.no_grad():
        other = _logits(m, ids)
        for n, p in lora.items():
            p[1:] = p[:1].clone()
        assert not torch.allclose(_logits(m, ids), other)


def test_loop_lora_off_and_at_init_is_plain_recurrence():
    ids = token_ids(seed=10)
    _, plain = build(**LOOP)
    _, init = build(LOOP_LORA_RANK=4, **LOOP)  # B = 0, and the trunk's init is the same (private generator)
    assert all(torch.equal(p, dict(init.named_parameters())[n]) for n, p in plain.named_parameters())
    for m in (plain, init):
        m.looping_active = True
    torch.testing.assert_close(_logits(init, ids), _logits(plain, ids), rtol=0, atol=1e-6)
    _, off = build(LOOP_LORA_RANK=0, **LOOP)
    off.looping_active = True
    assert not any(".loop_" in n for n, _ in off.named_parameters()) and torch.equal(_logits(off, ids), _logits(plain, ids))
    with pytest.raises(tg.ConfigError, match="LOOP_LORA_RANK=4 with NUM_LOOPS=0"):
        make_cfg(LOOP_LORA_RANK=4)
