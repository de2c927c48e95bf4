"""Every architectural feature as an env switch: maths against an independent reference, "off means
off" (bit-identical to the base), transparency at init, causality, and config validation.
CPU, tiny shapes (vocab 64, dim 32, 4 heads x 8, 4 layers, seq 16); the reference is in feature_ref.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from feature_ref import (BASE, BOS, V, bigram_bucket, build, make_cfg, perturb, ref_attention_core, ref_embed,
                         ref_logits, ref_mlp, ref_rope, ref_tie, spec_order, spec_ve_layers, spec_windows, spec_xsa,
                         token_ids)

# ================================================================================================
# 1. maths against the reference (whole model, float64, every zero-init parameter made non-zero)
# ================================================================================================

FEATURES = {
    "plain": {},
    "untied": dict(TIE_EMBEDDINGS=0),
    "softcap": dict(LOGIT_SOFTCAP=5),
    "windows_SSL_short3": dict(WINDOW_PATTERN="SSL", WINDOW_SHORT=3),
    "windows_S_default_short": dict(WINDOW_PATTERN="S"),
    "windows_SL_short1": dict(WINDOW_PATTERN="sl", WINDOW_SHORT=1),
    "head_dim16_mqa": dict(HEAD_DIM=16, NUM_KV_HEADS=1),
    "mha": dict(NUM_KV_HEADS=4),
    "ve_full_learned_alternating": dict(VE_ENABLED=1, VE_DIM=0, VE_GATE_WIDTH=8),
    "ve_full_fixed_all": dict(VE_ENABLED=1, VE_DIM=0, VE_LAYERS="all", VE_GATE="fixed"),
    "ve_shared_learned_list": dict(VE_ENABLED=1, VE_DIM=8, VE_LAYERS="0,2", VE_GATE_WIDTH=5),
    "ve_shared_fixed_all_mqa": dict(VE_ENABLED=1, VE_DIM=8, VE_LAYERS="all", VE_GATE="fixed", NUM_KV_HEADS=1),
    "value_residual": dict(VALUE_RESIDUAL=1),
    "value_residual_ve": dict(VALUE_RESIDUAL=1, VE_ENABLED=1, VE_DIM=8, VE_LAYERS="all"),
    "gated_attention": dict(GATED_ATTENTION=1),
    "attn_out_gate_resid": dict(ATTN_OUT_GATE=1, GATE_WIDTH=5),
    "attn_out_gate_proj": dict(ATTN_OUT_GATE=1, GATE_ATTN_SRC="proj", GATE_WIDTH=5),
    "sparse_attn_gate": dict(SPARSE_ATTN_GATE=1, GATE_WIDTH=6, SPARSE_ATTN_GATE_SCALE=0.7),
    "xsa_all": dict(XSA_LAST_N=-1),
    "xsa_last2": dict(XSA_LAST_N=2),
    "xsa_mha_vr_ve": dict(XSA_LAST_N=-1, NUM_KV_HEADS=4, VALUE_RESIDUAL=1, VE_ENABLED=1, VE_DIM=0),
    "partial_rope": dict(ROPE_DIMS=4, ROPE_BASE=100),
    "full_rope_base": dict(ROPE_BASE=500),
    "shared_head_dim": dict(SHARED_HEAD_DIM=2, ROPE_DIMS=4),
    "shared_head_dim_mqa": dict(SHARED_HEAD_DIM=4, ROPE_DIMS=2, NUM_KV_HEADS=1),
    "qk_gain": dict(QK_GAIN_INIT=2.5),
    "ln_scale_input": dict(LN_SCALE=1),
    "ln_scale_output": dict(LN_SCALE=1, LN_SCALE_MODE="output"),
    "relu2": dict(LEAKY_SLOPE=0),
    "leaky03": dict(LEAKY_SLOPE=0.3),
    "smear_v1": dict(SMEAR_GATE=1, SMEAR_GATE_MODE="v1"),
    "smear_v1_leaky_bos": dict(SMEAR_GATE=1, SMEAR_GATE_MODE="v1", SMEAR_BOS_FIX=0),
    "smear_v2": dict(SMEAR_GATE=1, SMEAR_GATE_WIDTH=5),
    "smear_v2_gate_width": dict(SMEAR_GATE=1, GATE_WIDTH=7),
    "smear_v2_leaky_bos": dict(SMEAR_GATE=1, SMEAR_BOS_FIX=0),
    "bigram": dict(BIGRAM_HASH=1, BIGRAM_BUCKETS=37, BIGRAM_DIM=8),
    "unet": dict(UNET_SKIPS=1, SKIP_GATES_ENABLED=0),
    "unet_gates": dict(UNET_SKIPS=1, SKIP_GATES_ENABLED=1),
    "loops": dict(NUM_LOOPS=2, LOOP_START=1, LOOP_END=2, UNET_SKIPS=1),
    "loops_from_layer0_vr": dict(NUM_LOOPS=1, LOOP_START=0, LOOP_END=1, VALUE_RESIDUAL=1),
    "parallel": dict(PARALLEL_START_LAYER=2, UNET_SKIPS=1),
    "parallel_skip_both": dict(PARALLEL_START_LAYER=2, UNET_SKIPS=1, PARALLEL_SKIP="both"),
    "parallel_loops_seq_after_par": dict(PARALLEL_START_LAYER=2, NUM_LOOPS=2, LOOP_START=1, LOOP_END=3, UNET_SKIPS=1),
    "doc_attention_windows": dict(DOC_ATTENTION=1, WINDOW_PATTERN="SL", WINDOW_SHORT=4),
    "everything": dict(LN_SCALE=1, ROPE_DIMS=4, SHARED_HEAD_DIM=2, XSA_LAST_N=-1, VE_ENABLED=1, VE_DIM=8,
                       VALUE_RESIDUAL=1, ATTN_OUT_GATE=1, SMEAR_GATE=1, BIGRAM_HASH=1, BIGRAM_BUCKETS=37,
                       BIGRAM_DIM=8, NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=2, UNET_SKIPS=1,
                       WINDOW_PATTERN="SSL", WINDOW_SHORT=5, LOGIT_SOFTCAP=7, DOC_ATTENTION=1, QK_GAIN_INIT=3),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_model_matches_reference(name):
    cfg, model = build(**FEATURES[name])
    model = perturb(model.double())
    ids = token_ids(seed=3)
    for looping in ([False, True] if cfg.num_loops else [False]):
        model.looping_active = looping
        with torch.no_grad():
            got = model.forward_logits(ids, tg.resolve_kernels(cfg, "cpu").masks(ids, BOS))
            ref = ref_logits(model, ids)
        assert got.shape == (2, 16, V)
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5, msg=f"{name} looping={looping}")


def test_reference_features_are_not_vacuous():
    """Each feature changes the logits once its parameters are non-zero (so the reference test bites)."""
    _, base = build()
    ids = token_ids(seed=3)
    ref0 = perturb(base.double()).forward_logits(ids)
    for name, kw in FEATURES.items():
        if name == "plain" or set(kw) <= {"SKIP_GATES_ENABLED"}:
            continue
        cfg, m = build(**kw)
        m = perturb(m.double())
        m.looping_active = cfg.num_loops > 0
        with torch.no_grad():
            out = m.forward_logits(ids, tg.resolve_kernels(cfg, "cpu").masks(ids, BOS))
        assert not torch.allclose(out, ref0, atol=1e-4), name


# ------------------------------------------------------------------------------------------------
# attention windows
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,layers,expected", [
    ("SSSL", 8, "SSSLSSSL"), ("SL", 8, "SLSLSLSL"), ("SSLL", 8, "SSLLSSLL"), ("L", 8, "LLLLLLLL"),
    ("SSSLSSLL", 8, "SSSLSSLL"), ("S", 3, "SSL"), ("SSSL", 6, "SSSLSL"), ("SSSS", 1, "L"),
])
def test_window_pattern_tiling_last_layer_forced_L(pattern, layers, expected):
    cfg = make_cfg(NUM_LAYERS=layers, WINDOW_PATTERN=pattern, TRAIN_SEQ_LEN=16)
    got = cfg.layer_windows()
    assert got == [8 if c == "S" else 0 for c in expected] == spec_windows(cfg)
    assert got[-1] == 0
    cfg = make_cfg(NUM_LAYERS=layers, WINDOW_PATTERN=pattern, WINDOW_SHORT=5)
    assert cfg.layer_windows() == [5 if c == "S" else 0 for c in expected]
    _, model = build(NUM_LAYERS=layers, WINDOW_PATTERN=pattern, WINDOW_SHORT=5)
    assert [b.attn.window for b in model.blocks] == cfg.layer_windows()


def _qkv(B=2, T=12, H=4, Hkv=2, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, T, h, D, generator=g, dtype=dtype)
    return mk(H), mk(Hkv), mk(Hkv)


@pytest.mark.parametrize("window", [0, 1, 3, 11, 20])
@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_attend_matches_naive_masked_softmax(window, hkv):
    pattern = "SL" if window else "L"
    cfg = make_cfg(NUM_KV_HEADS=hkv, WINDOW_PATTERN=pattern, WINDOW_SHORT=window or 0, NUM_LAYERS=2)
    attn = tg.GPT(cfg).blocks[0].attn.double()
    assert attn.window == window
    q, k, v = _qkv(Hkv=hkv)
    ref = ref_attention_core(q, k, v, window)
    # direct call (no mask objects), and the mask objects the training/eval loops pass
    torch.testing.assert_close(attn.attend(q, k, v, None), ref)
    torch.testing.assert_close(attn.attend(q, k, v, tg.resolve_kernels(cfg, "cpu").masks(torch.zeros(2, 12, dtype=torch.long), BOS)), ref)


def test_attend_doc_masks_match_naive():
    cfg = make_cfg(DOC_ATTENTION=1, WINDOW_PATTERN="SL", WINDOW_SHORT=3, NUM_LAYERS=2)
    model = tg.GPT(cfg, bos_id=BOS)
    ids = token_ids(T=12, bos_positions=(0, 4, 5, 9))
    ids[1, 4] = 7  # a different document layout in the second row
    masks = tg.resolve_kernels(cfg, "cpu").masks(ids, BOS)
    doc = torch.cumsum((ids == BOS).long(), 1)
    q, k, v = _qkv()
    for block in model.blocks:
        attn = block.attn.double()
        torch.testing.assert_close(attn.attend(q, k, v, masks), ref_attention_core(q, k, v, attn.window, doc))


# ------------------------------------------------------------------------------------------------
# heads, GQA / MQA
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,H,Hkv,D", [
    (dict(), 4, 2, 8), (dict(NUM_KV_HEADS=1), 4, 1, 8), (dict(NUM_KV_HEADS=4), 4, 4, 8),
    (dict(HEAD_DIM=16, NUM_KV_HEADS=2), 2, 2, 16), (dict(HEAD_DIM=4, NUM_KV_HEADS=2), 8, 2, 4),
    (dict(NUM_HEADS=2, NUM_KV_HEADS=1), 2, 1, 16),
])
def test_head_shapes(kw, H, Hkv, D):
    cfg, model = build(**kw)
    assert (cfg.n_heads, cfg.num_kv_heads, cfg.d_head) == (H, Hkv, D)
    a = model.blocks[0].attn
    assert a.c_q.weight.shape == (H * D, 32) and a.proj.weight.shape == (32, H * D)
    assert a.c_k.weight.shape == (Hkv * D, 32) and a.c_v.weight.shape == (Hkv * D, 32)
    assert a.q_gain.shape == (H,)
    assert model.forward_logits(token_ids()).shape == (2, 16, V)


def test_head_dim_overrides_num_heads_exactly():
    _, a = build(HEAD_DIM=8, NUM_HEADS=2)
    _, b = build(NUM_HEADS=4)
    ids = token_ids()
    assert torch.equal(perturb(a).forward_logits(ids), perturb(b).forward_logits(ids))


@pytest.mark.parametrize("hkv", [1, 2])
def test_gqa_equals_mha_with_repeated_kv(hkv):
    kw = dict(XSA_LAST_N=-1, VALUE_RESIDUAL=1, ROPE_DIMS=4, LN_SCALE=1)
    _, g = build(NUM_KV_HEADS=hkv, **kw)
    g = perturb(g.double())
    _, m = build(NUM_KV_HEADS=4, **kw)
    m = m.double()
    rep = 4 // hkv
    state = {}
    for name, p in g.state_dict().items():
        if name.endswith(("c_k.weight", "c_v.weight")):
            p = p.view(hkv, 8, 32).repeat_interleave(rep, 0).reshape(32, 32)  # query head h uses KV head h // rep
        state[name] = p
    m.load_state_dict(state)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(m.forward_logits(ids), g.forward_logits(ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# value embeddings and value residual
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,spec,expected", [
    (8, "alternating", [1, 3, 5, 7]), (11, "alternating", [0, 2, 4, 6, 8, 10]), (12, "alternating", list(range(1, 12, 2))),
    (4, "all", [0, 1, 2, 3]), (4, "none", []), (4, "0,2", [0, 2]), (4, " 3, 1 ", [1, 3]),
])
@pytest.mark.parametrize("ve_dim", [0, 8])
def test_ve_layer_selection_and_params(layers, spec, expected, ve_dim):
    cfg, model = build(NUM_LAYERS=layers, VE_ENABLED=1, VE_LAYERS=spec, VE_DIM=ve_dim)
    assert cfg.ve_layer_ids() == expected == spec_ve_layers(cfg)
    names = dict(model.named_parameters())
    for l in range(layers):
        assert model.blocks[l].attn.has_ve == (l in expected)
        assert (f"blocks.{l}.attn.ve_gate.weight" in names) == (l in expected)
        assert (f"blocks.{l}.attn.ve_table.weight" in names) == (l in expected and ve_dim == 0)
        if l in expected:
            assert names[f"blocks.{l}.attn.ve_gate.weight"].shape == (2, 32)  # one gate per KV head
            assert not names[f"blocks.{l}.attn.ve_gate.weight"].any()        # 2*sigmoid(0) = 1 at init
            if ve_dim == 0:
                t = names[f"blocks.{l}.attn.ve_table.weight"]
                assert t.shape == (V, 16) and t.abs().max() <= 3 ** 0.5 / 32 ** 0.5 and t.std() > 0
    shared = bool(expected) and ve_dim > 0
    assert ("ve_shared.weight" in names) == shared and ("ve_proj.weight" in names) == shared
    if shared:
        assert names["ve_shared.weight"].shape == (V, 8) and names["ve_proj.weight"].shape == (16, 8)
        assert not names["ve_proj.weight"].any() and names["ve_scale"].item() == pytest.approx(0.1)
        assert torch.all(names["ve_layer_scales"] == 1)


def test_ve_disabled_or_fixed_gate_has_no_gate_params():
    _, m = build(VE_ENABLED=1, VE_GATE="fixed", VE_DIM=0)
    assert not any("ve_gate" in n for n, _ in m.named_parameters())
    _, m = build(VE_ENABLED=0, VE_LAYERS="all", VE_DIM=0)
    assert not any("ve" in n for n, _ in m.named_parameters())


class _RecordV:
    """Patch Attention.attend to record the v each layer attends with (after VE and value residual)."""

    def __init__(self, monkeypatch):
        self.vs = []
        orig = tg.Attention.attend
        rec = self

        def attend(this, q, k, v, masks):
            rec.vs.append((this.layer, v.detach().clone()))
            return orig(this, q, k, v, masks)
        monkeypatch.setattr(tg.Attention, "attend", attend)


def test_value_residual_mixes_first_executed_block(monkeypatch):
    cfg, model = build(VALUE_RESIDUAL=1, NUM_LOOPS=1, LOOP_START=0, LOOP_END=1)
    model = perturb(model.double())
    assert torch.all(tg.GPT(cfg).vr_lambdas == 0.5) and tg.GPT(cfg).vr_lambdas.shape == (4, 2)
    ids = token_ids()
    with torch.no_grad():
        model.vr_lambdas.copy_(torch.tensor([[0.0, 1.0]] * 4))
        rec = _RecordV(monkeypatch)
        model.looping_active = True
        model.forward_logits(ids)
        own = list(rec.vs)
        assert [l for l, _ in own] == [0, 1, 0, 1, 2, 3] == spec_order(cfg, True)
        model.vr_lambdas.copy_(torch.tensor([[1.0, 0.0]] * 4))
        rec.vs.clear()
        model.forward_logits(ids)
        v0 = rec.vs[0][1]
        for (_, v) in rec.vs[1:]:  # lambda = (1, 0): every later block attends with the first block's v
            torch.testing.assert_close(v, v0)
        model.vr_lambdas.copy_(torch.tensor([[0.3, 0.9]] * 4))
        rec.vs.clear()
        model.forward_logits(ids)
        first_vs = [v for (l, v) in own]
        # layers >= 1 (and layer 0 on its second pass): 0.3 v0 + 0.9 v_own; own v of a later pass differs
        torch.testing.assert_close(rec.vs[1][1], 0.3 * v0 + 0.9 * first_vs[1])


def test_ve_added_before_value_residual_cache(monkeypatch):
    """VE on layer 0 flows into v0 (the cache is taken after VE)."""
    _, model = build(VALUE_RESIDUAL=1, VE_ENABLED=1, VE_DIM=0, VE_LAYERS="0", VE_GATE="fixed")
    model = perturb(model.double())
    ids = token_ids()
    rec = _RecordV(monkeypatch)
    with torch.no_grad():
        model.forward_logits(ids)
        h = ref_embed(model.cfg, dict(model.named_parameters()), ids)
        b0 = model.blocks[0]
        xin = b0.resid_mix[0] * h + b0.resid_mix[1] * h
        raw_v = (F.rms_norm(xin, (32,)) @ b0.attn.c_v.weight.T).view(2, 16, 2, 8)
        ve = b0.attn.ve_table.weight[ids].view(2, 16, 2, 8)
    torch.testing.assert_close(rec.vs[0][1], raw_v + ve)


# ------------------------------------------------------------------------------------------------
# output gates and XSA
# ------------------------------------------------------------------------------------------------

def test_gate_params_and_init():
    _, m = build(GATED_ATTENTION=1)
    a = m.blocks[0].attn
    assert a.attn_gate.weight.shape == (4, 32) and not a.attn_gate.weight.any()
    assert torch.all(a.attn_gate_bias == 4.0)  # sigma(4) = 0.982, nearly open
    _, m = build(ATTN_OUT_GATE=1, GATE_WIDTH=5)
    assert m.blocks[0].attn.attn_out_gate_w.shape == (4, 5) and not m.blocks[0].attn.attn_out_gate_w.any()
    _, m = build(SPARSE_ATTN_GATE=1, GATE_WIDTH=6)
    assert m.blocks[0].attn.attn_gate_w.shape == (4, 6) and not m.blocks[0].attn.attn_gate_w.any()


def test_attn_out_gate_source_matters():
    ids = token_ids()
    outs = []
    for src in ("resid", "proj"):
        _, m = build(ATTN_OUT_GATE=1, GATE_ATTN_SRC=src, GATE_WIDTH=5)
        outs.append(perturb(m.double()).forward_logits(ids))
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


@pytest.mark.parametrize("kw,expected", [
    (dict(XSA_LAST_N=-1), [1, 1, 1, 1]), (dict(XSA_LAST_N=0), [0, 0, 0, 0]), (dict(XSA_LAST_N=1), [0, 0, 0, 1]),
    (dict(XSA_LAST_N=3), [0, 1, 1, 1]), (dict(XSA_LAST_N=4), [1, 1, 1, 1]),  # > NUM_LAYERS is refused (test_hardening)
    (dict(XSA_LAST_N=None, XSA_LAYERS=2), [0, 0, 1, 1]), (dict(XSA_LAST_N=None, XSA_LAYERS=0), [0, 0, 0, 0]),
    (dict(XSA_LAST_N=None, XSA_LAYERS=-1), [1, 1, 1, 1]),
])
def test_xsa_layer_selection(kw, expected):
    cfg, m = build(**kw)
    assert [int(b.attn.xsa) for b in m.blocks] == expected == [int(spec_xsa(cfg, l)) for l in range(4)]


@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_xsa_output_orthogonal_to_own_value(monkeypatch, hkv):
    _, model = build(XSA_LAST_N=-1, NUM_KV_HEADS=hkv, VALUE_RESIDUAL=1)
    model = perturb(model.double())
    rec = _RecordV(monkeypatch)
    ys = []
    for b in model.blocks:
        b.attn.proj.register_forward_pre_hook(lambda mod, args: ys.append(args[0].detach().clone()))
    with torch.no_grad():
        model.forward_logits(token_ids())
    for (layer, v), y in zip(rec.vs, ys):
        y = y.view(2, 16, 4, 8)
        vg = v.repeat_interleave(4 // hkv, dim=2)  # own value of each query head's KV group
        dots = (y * F.normalize(vg, dim=-1)).sum(-1)
        assert dots.abs().max() < 1e-10, layer
        assert y.abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# partial RoPE
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r,base", [(4, 10000.0), (8, 10000.0), (2, 50.0), (6, 1000.0)])
def test_rotary_partial_formula(r, base):
    rot = tg.Rotary(r, base)
    torch.testing.assert_close(rot.inv_freq, torch.tensor([base ** (-2 * i / r) for i in range(r // 2)], dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 3, 8, generator=g)
    y = rot(x)
    assert torch.equal(y[..., r:], x[..., r:])  # dims beyond R untouched
    torch.testing.assert_close(y, ref_rope(x, r, base), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(tg.Rotary(r, base, max_len=4)(x), y)  # past the table: computed on the fly, the same values
    # relative positions: <rot(q)_t, rot(k)_{t-d}> is the same for every t
    q = torch.randn(1, 1, 1, 8, generator=g).expand(1, 10, 1, 8)
    k = torch.randn(1, 1, 1, 8, generator=g).expand(1, 10, 1, 8)
    rq, rk = rot(q.contiguous()), rot(k.contiguous())
    for d in (0, 1, 3):
        dots = (rq[0, d:, 0] * rk[0, :10 - d, 0]).sum(-1)
        torch.testing.assert_close(dots, dots[:1].expand_as(dots), rtol=1e-5, atol=1e-5)


def test_rope_dims_zero_means_full_and_model_uses_rope_dims():
    _, a = build(ROPE_DIMS=0)
    _, b = build(ROPE_DIMS=8)
    ids = token_ids()
    assert torch.equal(perturb(a).forward_logits(ids), perturb(b).forward_logits(ids))
    _, c = build(ROPE_DIMS=4)
    assert c.blocks[0].attn.rotary.r == 4 and a.blocks[0].attn.rotary.r == 8


# ------------------------------------------------------------------------------------------------
# shared-specific Q/K (SHARED_HEAD_DIM)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hkv,s", [(2, 2), (1, 4), (4, 3)])
def test_shared_head_dim_tied_view(hkv, s):
    _, m = build(SHARED_HEAD_DIM=s, ROPE_DIMS=4, NUM_KV_HEADS=hkv)
    perturb(m)
    a = m.blocks[1].attn
    for lin, heads in ((a.c_q, 4), (a.c_k, hkv)):
        raw = lin.weight.detach().view(heads, 8, 32)
        eff = lin.effective_weight().detach().view(heads, 8, 32)
        assert torch.equal(eff[:, :8 - s], raw[:, :8 - s])  # specific rows untouched
        for h in range(heads):
            torch.testing.assert_close(eff[h, 8 - s:], raw[:, 8 - s:].mean(0))
        torch.testing.assert_close(eff.reshape(heads * 8, 32), ref_tie(lin.weight.detach(), heads, 8, s))
    assert a.c_v.shared is None and torch.equal(a.c_v.effective_weight(), a.c_v.weight)  # V untouched
    if hkv == 1:  # MQA: K sharing is a no-op
        torch.testing.assert_close(a.c_k.effective_weight(), a.c_k.weight)


def test_shared_head_dim_gradient_is_shared():
    _, m = build(SHARED_HEAD_DIM=2, ROPE_DIMS=4)
    perturb(m)
    ids = token_ids()
    m(ids, torch.roll(ids, -1, 1)).backward()
    for name in ("c_q", "c_k"):
        gw = getattr(m.blocks[2].attn, name).weight.grad
        heads = gw.shape[0] // 8
        g3 = gw.view(heads, 8, 32)
        for h in range(1, heads):
            torch.testing.assert_close(g3[h, 6:], g3[0, 6:])
        assert not torch.allclose(g3[0, :6], g3[1, :6])


def test_bake_shared_heads_identical_rows_same_output():
    _, m = build(SHARED_HEAD_DIM=2, ROPE_DIMS=4, XSA_LAST_N=-1)
    m = perturb(m.double())
    ids = token_ids()
    with torch.no_grad():
        before = m.forward_logits(ids)
        tg.bake_shared_heads(m)
        for b in m.blocks:
            assert b.attn.c_q.shared is None and b.attn.c_k.shared is None
            for lin, heads in ((b.attn.c_q, 4), (b.attn.c_k, 2)):
                w = lin.weight.view(heads, 8, 32)
                for h in range(1, heads):
                    assert torch.equal(w[h, 6:], w[0, 6:])
        after = m.forward_logits(ids)
        torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        tg.bake_shared_heads(m)  # idempotent
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
        # baked raw weights in an SHD model (tie on again) give the same forward: the tie is a no-op now
        _, m2 = build(SHARED_HEAD_DIM=2, ROPE_DIMS=4, XSA_LAST_N=-1)
        m2 = m2.double()
        m2.load_state_dict(state)
        torch.testing.assert_close(m2.forward_logits(ids), before, rtol=1e-6, atol=1e-6)
        tg.bake_shared_heads(m2)  # baking a loaded (already baked) model again changes nothing
        for k, v in state.items():
            torch.testing.assert_close(m2.state_dict()[k], v, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# softcap, q gain, LN scale, activation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [1.0, 5.0, 30.0])
def test_logit_softcap(cap):
    _, raw_m = build(LOGIT_SOFTCAP=0)
    _, cap_m = build(LOGIT_SOFTCAP=cap)
    perturb(raw_m, scale=1.0)
    perturb(cap_m, scale=1.0)
    ids = token_ids()
    with torch.no_grad():
        z = raw_m.forward_logits(ids)
        assert torch.equal(z, F.linear(raw_m.hidden(ids), raw_m.tok_emb.weight).float())  # 0 = off exactly
        torch.testing.assert_close(cap_m.forward_logits(ids), cap * torch.tanh(z / cap))
        assert cap_m.forward_logits(ids).abs().max() <= cap
        assert z.abs().max() > 1.0


@pytest.mark.parametrize("g", [1.0, 2.5, 5.25])
def test_qk_gain_init(g):
    _, m = build(QK_GAIN_INIT=g, NUM_HEADS=2, NUM_KV_HEADS=1)
    for b in m.blocks:
        assert b.attn.q_gain.shape == (2,) and torch.all(b.attn.q_gain == g)


@pytest.mark.parametrize("mode", ["input", "output"])
def test_ln_scale_factors(mode):
    _, m = build(LN_SCALE=1, LN_SCALE_MODE=mode, NUM_LAYERS=5)
    for l, b in enumerate(m.blocks):
        s = 1 / math.sqrt(l + 1)
        assert (b.s_in, b.s_out) == ((s, 1.0) if mode == "input" else (1.0, s))
    _, off = build(LN_SCALE=0, LN_SCALE_MODE=mode)
    assert all((b.s_in, b.s_out) == (1.0, 1.0) for b in off.blocks)


def test_ln_scale_input_mode_scales_mlp_quadratically():
    """Input mode: the MLP (degree-2 homogeneous) sees s*h, so its output scales by s^2; output mode by s."""
    cfg, m = build(LN_SCALE=1, LEAKY_SLOPE=0.5)
    mlp = perturb(m).blocks[3].mlp
    h = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
    s = 0.5
    torch.testing.assert_close(mlp(h * s), mlp(h) * s * s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("slope", [0.0, 0.3, 0.5, 0.75])
def test_leaky_relu_squared(slope):
    _, m = build(LEAKY_SLOPE=slope)
    mlp = perturb(m).blocks[0].mlp
    P = dict(m.blocks[0].named_parameters())
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mlp(x), ref_mlp(P, "mlp.", x, slope))
    if slope == 0.0:  # relu^2 through the same code path
        torch.testing.assert_close(mlp(x), (torch.relu(x @ mlp.fc.weight.T) ** 2) @ mlp.proj.weight.T)


# ------------------------------------------------------------------------------------------------
# SmearGate and BigramHash (embedding stream)
# ------------------------------------------------------------------------------------------------

SMEARS = {"v1": dict(SMEAR_GATE=1, SMEAR_GATE_MODE="v1"), "v2": dict(SMEAR_GATE=1, SMEAR_GATE_WIDTH=5)}


@pytest.mark.parametrize("mode", ["v1", "v2"])
@pytest.mark.parametrize("fix", [1, 0])
def test_smear_gate_embed_and_bos(mode, fix):
    _, m = build(SMEAR_BOS_FIX=fix, **SMEARS[mode])
    _, plain = build()
    perturb(m)
    perturb(plain)
    ids = token_ids(bos_positions=(0, 6, 11))
    P = dict(m.named_parameters())
    with torch.no_grad():
        x = m.embed(ids)
        torch.testing.assert_close(x, ref_embed(m.cfg, P, ids))
        unsmeared = plain.embed(ids)
        assert torch.equal(plain.tok_emb.weight, m.tok_emb.weight)
        bos = ids == BOS
        if fix:  # output at BOS positions equals the un-smeared value
            torch.testing.assert_close(x[bos], unsmeared[bos], rtol=0, atol=1e-7)
        assert not torch.allclose(x[~bos], unsmeared[~bos])
        # nothing crosses a BOS: change the tokens before position 6 (a BOS) -> outputs from 6 on are unchanged
        ids2 = ids.clone()
        ids2[:, 1:6] = (ids2[:, 1:6] + 5) % (V - 2) + 2
        x2 = m.embed(ids2)
        same = torch.allclose(x2[:, 6:], x[:, 6:], rtol=0, atol=1e-7)
        assert same == bool(fix)


def test_smear_gate_params_and_width():
    _, m = build(SMEAR_GATE=1, SMEAR_GATE_MODE="v1")
    assert m.smear_gamma.shape == (32,) and not m.smear_gamma.any()  # sigmoid(0) = 0.5 blend
    _, m = build(SMEAR_GATE=1, GATE_WIDTH=7)
    assert m.smear_w.numel() == 7 and not m.smear_w.any() and m.smear_lambda.item() == 0
    _, m = build(SMEAR_GATE=1, GATE_WIDTH=7, SMEAR_GATE_WIDTH=3)
    assert m.smear_w.numel() == 3


def test_bigram_hash_buckets():
    nb = 16
    _, m = build(BIGRAM_HASH=1, BIGRAM_BUCKETS=nb, BIGRAM_DIM=nb)
    assert m.bigram_table.weight.shape == (nb, nb) and not m.bigram_table.weight.any()
    assert m.bigram_scale.item() == pytest.approx(0.05)
    ids = torch.tensor([[5, 7, 9, 1, 63, 63, 2], [1, 1, 40, 13, 5, 7, 9]])
    expected = [[bigram_bucket(int(r[t]), int(r[t - 1]) if t else None, nb, 1) for t in range(ids.shape[1])] for r in ids]
    assert expected[0][3] == nb - 1  # BOS (id 1) never hashes the previous document's token
    assert expected[0][0] == expected[1][0] == nb - 1  # position 0 -> bucket B-1
    assert expected[0][1] == ((36313 * 7) ^ (27191 * 5)) % (nb - 1)
    with torch.no_grad():  # table row b = one-hot(b), projection = [I; 0], no token embedding -> argmax = bucket
        m.tok_emb.weight.zero_()
        m.bigram_table.weight.copy_(torch.eye(nb))
        m.bigram_proj.weight.copy_(torch.cat([torch.eye(nb), torch.zeros(32 - nb, nb)]))
        m.bigram_scale.fill_(1.0)
        got = m.embed(ids)[..., :nb].argmax(-1)
    assert got.tolist() == expected


# ------------------------------------------------------------------------------------------------
# depth recurrence, parallel lanes, U-Net skips
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L,s,e,n,expected", [
    (6, 1, 3, 2, [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 5]),
    (11, 3, 5, 2, [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]),
    (4, 0, 0, 1, [0, 0, 1, 2, 3]),
    (4, 3, 3, 3, [0, 1, 2, 3, 3, 3, 3]),
])
def test_layer_order(L, s, e, n, expected):
    cfg = make_cfg(NUM_LAYERS=L, NUM_LOOPS=n, LOOP_START=s, LOOP_END=e)
    assert tg.layer_order(cfg, True) == expected == spec_order(cfg, True)
    assert tg.layer_order(cfg, False) == list(range(L))
    off = make_cfg(NUM_LAYERS=L, NUM_LOOPS=0, LOOP_START=s, LOOP_END=e)
    assert tg.layer_order(off, True) == list(range(L))


def test_looping_active_switch():
    cfg, m = build(NUM_LOOPS=2, LOOP_START=1, LOOP_END=2, UNET_SKIPS=1)
    assert m.looping_active is False
    assert m.skip_weights.shape == (4, 32)  # half of the 8 virtual layers of the looped order
    perturb(m)
    ids = token_ids()
    with torch.no_grad():
        off = m.forward_logits(ids)
        m.looping_active = True
        on = m.forward_logits(ids)
    assert not torch.allclose(on, off, atol=1e-4)
    calls = []
    for i, b in enumerate(m.blocks):
        b.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
    with torch.no_grad():
        m.forward_logits(ids)
    assert calls == spec_order(cfg, True)


def test_parallel_lanes_params_and_layers():
    _, m = build(PARALLEL_START_LAYER=2, PARALLEL_RESID_INIT=1.3)
    assert m.parallel_resid_lambdas.shape == (4, 2) and torch.all(m.parallel_resid_lambdas == 1.3)
    assert m.parallel_post_lambdas.shape == (4, 2, 2) and torch.all(m.parallel_post_lambdas == 1)
    par = []
    for i, b in enumerate(m.blocks):
        orig = b.forward_parallel
        b.forward_parallel = (lambda *a, i=i, orig=orig, **k: (par.append(i), orig(*a, **k))[1])
    m.forward_logits(token_ids())
    assert par == [2, 3]  # decoder layers >= PARALLEL_START_LAYER


@pytest.mark.parametrize("gates", [0, 1])
def test_unet_skip_params(gates):
    _, m = build(UNET_SKIPS=1, SKIP_GATES_ENABLED=gates, NUM_LAYERS=5)
    assert m.skip_weights.shape == (2, 32) and torch.all(m.skip_weights == 1)
    assert hasattr(m, "skip_gates") == bool(gates)
    if gates:
        assert not m.skip_gates.any()


# ================================================================================================
# 2. off means off; transparent features at init
# ================================================================================================

OFF = {  # each: the feature switched off while its sub-knobs take non-default values
    "ve": dict(VE_ENABLED=0, VE_DIM=0, VE_LAYERS="all", VE_GATE="fixed", VE_GATE_WIDTH=3),
    "ve_layers_none": dict(VE_ENABLED=1, VE_LAYERS="none", VE_DIM=8),
    "value_residual": dict(VALUE_RESIDUAL=0),
    "gated_attention": dict(GATED_ATTENTION=0),
    "attn_out_gate": dict(ATTN_OUT_GATE=0, GATE_ATTN_SRC="proj", GATE_WIDTH=5),
    "sparse_attn_gate": dict(SPARSE_ATTN_GATE=0, SPARSE_ATTN_GATE_SCALE=3.0, GATE_WIDTH=6),
    "xsa": dict(XSA_LAST_N=0),
    "xsa_alias": dict(XSA_LAST_N=None, XSA_LAYERS=0),
    "windows": dict(WINDOW_PATTERN="L", WINDOW_SHORT=3),
    "windows_last_layer_only": dict(NUM_LAYERS=1, WINDOW_PATTERN="S", WINDOW_SHORT=2),
    "shared_head_dim": dict(SHARED_HEAD_DIM=0, ROPE_DIMS=0),
    "rope_full": dict(ROPE_DIMS=8),
    "head_dim": dict(HEAD_DIM=8),
    "softcap": dict(LOGIT_SOFTCAP=0),
    "ln_scale": dict(LN_SCALE=0, LN_SCALE_MODE="output"),
    "smear": dict(SMEAR_GATE=0, SMEAR_GATE_MODE="v1", SMEAR_GATE_WIDTH=3, SMEAR_BOS_FIX=0),
    "smear_v2": dict(SMEAR_GATE=0, SMEAR_GATE_MODE="v2"),
    "bigram": dict(BIGRAM_HASH=0, BIGRAM_BUCKETS=37, BIGRAM_DIM=5),
    "loops": dict(NUM_LOOPS=0, LOOP_START=0, LOOP_END=3, ENABLE_LOOPING_AT=0.9),
    "parallel": dict(PARALLEL_START_LAYER=0, PARALLEL_RESID_INIT=0.3),
    "unet": dict(UNET_SKIPS=0, SKIP_GATES_ENABLED=0),
    "unet_gates": dict(UNET_SKIPS=0, SKIP_GATES_ENABLED=1),
    "doc_attention": dict(DOC_ATTENTION=0),
    "gate_width_unused": dict(GATE_WIDTH=3, SMEAR_GATE_WIDTH=2, VE_GATE_WIDTH=4),
}


def _same_params(a, b):
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(sa) == list(sb)
    for n in sa:
        assert sa[n].shape == sb[n].shape, n
        assert torch.equal(sa[n], sb[n]), n


@pytest.mark.parametrize("name", list(OFF))
def test_off_means_off(name):
    kw = OFF[name]
    nl = int(kw.get("NUM_LAYERS", 4))
    _, base = build(NUM_LAYERS=nl)
    _, m = build(**kw)
    _same_params(m, base)  # same names, shapes, and bit-identical init for the same seed
    m.looping_active = True  # a stale looping switch must not matter when NUM_LOOPS=0
    ids = token_ids(bos_positions=(0, 7, 8))
    with torch.no_grad():
        assert torch.equal(m.forward_logits(ids), base.forward_logits(ids))
        perturb(m)
        perturb(base)
        assert torch.equal(m.forward_logits(ids), base.forward_logits(ids))
        assert torch.equal(m(ids, ids), base(ids, ids))


def test_short_window_at_least_seq_len_equals_full_context():
    _, base = build()
    _, m = build(WINDOW_PATTERN="S", WINDOW_SHORT=15)
    perturb(base)
    perturb(m)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(m.forward_logits(ids, tg.resolve_kernels(m.cfg, "cpu").masks(ids, BOS)), base.forward_logits(ids))


TRANSPARENT = {
    "attn_out_gate_resid": dict(ATTN_OUT_GATE=1, GATE_WIDTH=5),
    "attn_out_gate_proj": dict(ATTN_OUT_GATE=1, GATE_ATTN_SRC="proj"),
    "smear_v2": dict(SMEAR_GATE=1, SMEAR_GATE_MODE="v2", SMEAR_GATE_WIDTH=5),
    "smear_v2_nofix": dict(SMEAR_GATE=1, SMEAR_BOS_FIX=0),
    "bigram": dict(BIGRAM_HASH=1, BIGRAM_BUCKETS=37, BIGRAM_DIM=8),
    "ve_shared_learned": dict(VE_ENABLED=1, VE_DIM=8, VE_LAYERS="all"),
    "ve_shared_fixed": dict(VE_ENABLED=1, VE_DIM=8, VE_GATE="fixed"),
    "all_of_them": dict(ATTN_OUT_GATE=1, SMEAR_GATE=1, BIGRAM_HASH=1, BIGRAM_BUCKETS=37, BIGRAM_DIM=8,
                        VE_ENABLED=1, VE_DIM=8),
}


@pytest.mark.parametrize("name", list(TRANSPARENT))
def test_transparent_at_init(name):
    _, base = build()
    _, m = build(**TRANSPARENT[name])
    ids = token_ids()
    common = {n for n, _ in base.named_parameters()}
    extra = {n for n, _ in m.named_parameters()} - common
    assert extra
    # switching the feature on does not shift the init of any other parameter (same seed)
    pm = dict(m.named_parameters())
    for n, p in base.named_parameters():
        assert torch.equal(pm[n], p), n
    with torch.no_grad():
        assert torch.equal(m.forward_logits(ids), base.forward_logits(ids))
        # with an active trunk (every common parameter moved identically) the new feature is still exact identity
        perturb(base)
        perturb(m, only=common)
        assert torch.equal(m.forward_logits(ids), base.forward_logits(ids))
        # ...and it stops being one as soon as its own parameters move
        perturb(m, only=extra)
        assert not torch.allclose(m.forward_logits(ids), base.forward_logits(ids), atol=1e-5)


def test_every_parameter_gets_a_gradient():
    """Every parameter is in the graph of every step (DDP without find_unused_parameters needs this),
    and each one gets a non-zero gradient within three optimizer steps from the real init."""
    for kw in (FEATURES["everything"], dict(VE_ENABLED=1, VE_DIM=0, VALUE_RESIDUAL=1, GATED_ATTENTION=1),
               dict(SMEAR_GATE=1, SMEAR_GATE_MODE="v1", SPARSE_ATTN_GATE=1, UNET_SKIPS=1, SKIP_GATES_ENABLED=0)):
        cfg, m = build(**kw)
        opts = tg.Optimizers(m, cfg)
        seen = {n: False for n, _ in m.named_parameters()}
        ids = token_ids(seed=5)
        for step in range(3):
            m.looping_active = cfg.num_loops > 0 and step > 0
            loss = m(ids, torch.roll(ids, -1, 1), tg.resolve_kernels(cfg, "cpu").masks(ids, BOS))
            loss.backward()
            for n, p in m.named_parameters():
                assert p.grad is not None, f"{n} unused in step {step} ({kw})"
                seen[n] |= bool(p.grad.abs().max() > 0)
            opts.step(1.0, step)
            opts.zero_grad()
        assert all(seen.values()), [n for n, s in seen.items() if not s]


def test_optimizer_groups_of_feature_params():
    _, m = build(**FEATURES["everything"], GATED_ATTENTION=0)
    groups = {n: g for g, items in tg.param_groups(m).items() for n, _ in items}
    _, m2 = build(GATED_ATTENTION=1, VE_ENABLED=1, VE_DIM=0, SMEAR_GATE=1, SMEAR_GATE_MODE="v1", SPARSE_ATTN_GATE=0)
    groups.update({n: g for g, items in tg.param_groups(m2).items() for n, _ in items})
    _, m3 = build(SPARSE_ATTN_GATE=1)
    groups.update({n: g for g, items in tg.param_groups(m3).items() for n, _ in items})
    expect = {
        "muon": ["blocks.0.attn.c_q.weight", "blocks.1.mlp.fc.weight", "blocks.3.attn.ve_gate.weight",
                 "blocks.0.attn.attn_gate.weight", "bigram_proj.weight", "ve_proj.weight"],
        "embed": ["tok_emb.weight", "bigram_table.weight", "ve_shared.weight", "blocks.3.attn.ve_table.weight"],
        "scalar": ["blocks.0.attn.attn_gate_bias", "blocks.0.attn.attn_out_gate_w", "blocks.0.attn.attn_gate_w",
                   "smear_w", "smear_lambda", "smear_gamma", "vr_lambdas", "ve_layer_scales", "ve_scale",
                   "bigram_scale", "blocks.0.attn.q_gain", "skip_weights", "skip_gates", "parallel_resid_lambdas",
                   "parallel_post_lambdas", "blocks.0.resid_mix", "blocks.0.attn_scale"],
    }
    for g, names in expect.items():
        for n in names:
            assert groups.get(n) == g, (n, groups.get(n), g)


# ================================================================================================
# 3. causality
# ================================================================================================

CAUSAL = {
    "base": {},
    "smear_v1": SMEARS["v1"], "smear_v1_nofix": dict(SMEARS["v1"], SMEAR_BOS_FIX=0),
    "smear_v2": SMEARS["v2"], "smear_v2_nofix": dict(SMEARS["v2"], SMEAR_BOS_FIX=0),
    "windows": dict(WINDOW_PATTERN="SSL", WINDOW_SHORT=3),
    "xsa": dict(XSA_LAST_N=-1), "xsa_mqa": dict(XSA_LAST_N=-1, NUM_KV_HEADS=1),
    "recurrence": dict(NUM_LOOPS=2, LOOP_START=1, LOOP_END=2, UNET_SKIPS=1),
    "bigram": dict(BIGRAM_HASH=1, BIGRAM_BUCKETS=37, BIGRAM_DIM=8),
    "ve_full": dict(VE_ENABLED=1, VE_DIM=0, VE_LAYERS="all"), "ve_shared": dict(VE_ENABLED=1, VE_DIM=8),
    "value_residual": dict(VALUE_RESIDUAL=1),
    "parallel": dict(PARALLEL_START_LAYER=2, UNET_SKIPS=1),
    "doc_attention": dict(DOC_ATTENTION=1),
    "gates": dict(ATTN_OUT_GATE=1), "gated_attention": dict(GATED_ATTENTION=1),
    "everything": FEATURES["everything"],
}


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal(name):
    cfg, m = build(**CAUSAL[name])
    perturb(m)
    m.looping_active = cfg.num_loops > 0
    ids = token_ids(B=1, T=24, seed=7, bos_positions=(0, 9))
    fwd = lambda x: m.forward_logits(x, tg.resolve_kernels(cfg, "cpu").masks(x, BOS))
    with torch.no_grad():
        ref = fwd(ids)
        for t in (1, 5, 9, 10, 17, 23):
            for new in (BOS, 42):
                ids2 = ids.clone()
                ids2[0, t] = new if ids[0, t] != new else 43
                out = fwd(ids2)
                assert torch.equal(out[:, :t], ref[:, :t]), (name, t)
                assert not torch.allclose(out[:, t:], ref[:, t:]), (name, t)


DOC_CASES = {
    "base": {},
    "windows": dict(WINDOW_PATTERN="SL", WINDOW_SHORT=20),
    "smear_v1": SMEARS["v1"], "smear_v2": SMEARS["v2"],
    "stack": dict(XSA_LAST_N=-1, VALUE_RESIDUAL=1, VE_ENABLED=1, VE_DIM=8, ATTN_OUT_GATE=1, SMEAR_GATE=1,
                  NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=2, UNET_SKIPS=1, LN_SCALE=1,
                  ROPE_DIMS=4, SHARED_HEAD_DIM=2),
}


@pytest.mark.parametrize("name", list(DOC_CASES))
def test_doc_attention_isolates_documents(name):
    cfg, m = build(DOC_ATTENTION=1, **DOC_CASES[name])
    perturb(m)
    m.looping_active = cfg.num_loops > 0
    ids = token_ids(B=2, T=24, seed=8, bos_positions=(0, 10, 17))
    with torch.no_grad():
        ref = m.forward_logits(ids, tg.resolve_kernels(cfg, "cpu").masks(ids, BOS))
        # the mask objects are built from the batch when the caller passes none
        assert torch.equal(m.forward_logits(ids), ref)
        for t in (2, 9, 12, 16):
            ids2 = ids.clone()
            ids2[:, t] = 3 if ids[0, t] != 3 else 4
            out = m.forward_logits(ids2, tg.resolve_kernels(cfg, "cpu").masks(ids2, BOS))
            start = 10 if t < 10 else 17  # the next document's BOS
            assert torch.equal(out[:, start:], ref[:, start:]), (name, t)
            assert not torch.allclose(out[:, t:start], ref[:, t:start])
    # control: without DOC_ATTENTION the later document does see the earlier one
    cfg2, m2 = build(DOC_ATTENTION=0, **DOC_CASES[name])
    perturb(m2)
    m2.looping_active = cfg2.num_loops > 0
    ids2 = ids.clone()
    ids2[:, 2] = 3 if ids[0, 2] != 3 else 4
    with torch.no_grad():
        assert not torch.allclose(m2.forward_logits(ids)[:, 10:], m2.forward_logits(ids2)[:, 10:])


# ================================================================================================
# 4. config validation
# ================================================================================================

@pytest.mark.parametrize("kw,names", [
    (dict(GATED_ATTENTION=1, ATTN_OUT_GATE=1), ["GATED_ATTENTION", "ATTN_OUT_GATE"]),
    (dict(GATED_ATTENTION=1, SPARSE_ATTN_GATE=1), ["GATED_ATTENTION", "SPARSE_ATTN_GATE"]),
    (dict(ATTN_OUT_GATE=1, SPARSE_ATTN_GATE=1), ["ATTN_OUT_GATE", "SPARSE_ATTN_GATE"]),
    (dict(ATTN_OUT_GATE=None, GATE_ATTN_OUT=1, GATED_ATTENTION=1), ["GATED_ATTENTION", "ATTN_OUT_GATE"]),
    (dict(ROPE_DIMS=6, SHARED_HEAD_DIM=4), ["ROPE_DIMS", "SHARED_HEAD_DIM"]),
    (dict(ROPE_DIMS=0, SHARED_HEAD_DIM=2), ["ROPE_DIMS", "SHARED_HEAD_DIM"]),
    (dict(SHARED_HEAD_DIM=8, ROPE_DIMS=2), ["SHARED_HEAD_DIM"]),
    (dict(ROPE_DIMS=3), ["ROPE_DIMS"]),
    (dict(ROPE_DIMS=10), ["ROPE_DIMS"]),
    (dict(NUM_KV_HEADS=3), ["NUM_KV_HEADS"]),
    (dict(NUM_KV_HEADS=8), ["NUM_KV_HEADS"]),
    (dict(NUM_KV_HEADS=0), ["NUM_KV_HEADS"]),
    (dict(HEAD_DIM=16, NUM_KV_HEADS=4), ["NUM_KV_HEADS"]),
    (dict(HEAD_DIM=12), ["HEAD_DIM"]),
    (dict(NUM_HEADS=5), ["NUM_HEADS"]),
    (dict(WINDOW_PATTERN="SXL"), ["WINDOW_PATTERN"]),
    (dict(WINDOW_PATTERN=""), ["WINDOW_PATTERN"]),
    (dict(WINDOW_PATTERN="S,L"), ["WINDOW_PATTERN"]),
    (dict(WINDOW_SHORT=-1), ["WINDOW_SHORT"]),
    (dict(VE_ENABLED=1, VE_LAYERS="0,4"), ["VE_LAYERS"]),
    (dict(VE_ENABLED=1, VE_LAYERS="-1"), ["VE_LAYERS"]),
    (dict(VE_ENABLED=1, VE_LAYERS="every"), ["VE_LAYERS"]),
    (dict(VE_ENABLED=1, VE_GATE_WIDTH=33), ["VE_GATE_WIDTH"]),
    (dict(VE_GATE="sigmoid"), ["VE_GATE"]),
    (dict(NUM_LOOPS=1, LOOP_START=1, LOOP_END=4), ["LOOP_END"]),
    (dict(NUM_LOOPS=1, LOOP_START=3, LOOP_END=2), ["LOOP_START"]),
    (dict(NUM_LOOPS=-1), ["NUM_LOOPS"]),
    (dict(PARALLEL_START_LAYER=4), ["PARALLEL_START_LAYER"]),
    (dict(GATE_WIDTH=0), ["GATE_WIDTH"]),
    (dict(GATE_WIDTH=33), ["GATE_WIDTH"]),
    (dict(SMEAR_GATE_WIDTH=33), ["SMEAR_GATE_WIDTH"]),
    (dict(LOGIT_SOFTCAP=-1), ["LOGIT_SOFTCAP"]),
    (dict(LEAKY_SLOPE=-0.1), ["LEAKY_SLOPE"]),
    (dict(LN_SCALE_MODE="both"), ["LN_SCALE_MODE"]),
    (dict(SMEAR_GATE_MODE="v3"), ["SMEAR_GATE_MODE"]),
    (dict(GATE_ATTN_SRC="q"), ["GATE_ATTN_SRC"]),
    (dict(BIGRAM_HASH=1, BIGRAM_BUCKETS=1), ["BIGRAM_BUCKETS"]),
    (dict(XSA_LAST_N=2, XSA_LAYERS=2), ["XSA_LAST_N", "XSA_LAYERS"]),
    (dict(ROPE_DIMS=4, PARTIAL_ROPE_DIMS=4), ["ROPE_DIMS", "PARTIAL_ROPE_DIMS"]),
])
def test_config_errors_name_the_variable(kw, names):
    with pytest.raises(tg.ConfigError) as ei:
        make_cfg(**kw)
    for n in names:
        assert n in str(ei.value), (str(ei.value), n)


def test_valid_edge_configs():
    make_cfg(ROPE_DIMS=4, SHARED_HEAD_DIM=4)  # R + S == head_dim is allowed
    make_cfg(NUM_LOOPS=1, LOOP_START=0, LOOP_END=3)
    make_cfg(NUM_LOOPS=0, LOOP_START=9, LOOP_END=99)  # loop range is only checked when looping is on
    with pytest.raises(tg.ConfigError, match="VE_LAYERS"):  # VE_LAYERS is checked even with VE off (a typo waits for nobody)
        make_cfg(VE_ENABLED=0, VE_LAYERS="7,8")
    make_cfg(PARALLEL_START_LAYER=3)
    make_cfg(WINDOW_PATTERN="sSlL")


def test_unknown_knob_warns():
    msgs = tg.unknown_knob_warnings({"MATRX_LR": "0.1"})
    assert len(msgs) == 1 and "MATRX_LR" in msgs[0] and "MATRIX_LR" in msgs[0]
    got = []
    cfg = tg.Config.from_env(dict(BASE, MATRX_LR="0.1", WINDOW_PATERN="SL"), warn=got.append)
    assert cfg.matrix_lr == tg.Config.from_env(BASE).matrix_lr
    assert any("MATRX_LR" in m for m in got) and any("WINDOW_PATERN" in m for m in got)
    assert not tg.unknown_knob_warnings(dict(BASE, XSA_LAYERS="2", VE128_DIM="8", PATH="/bin", HOME="/root",
                                             WORLD_SIZE="1", LOCAL_RANK="0"))


def test_parallel_skip_placement_changes_the_first_parallel_layer_only():
    """PARALLEL_SKIP=lane0 (record #1855) feeds the first parallel layer's U-Net skip into lane 0 only; both adds it
    before the lanes split. Same parameters, different function; without parallel lanes the switch does nothing."""
    ids = token_ids(B=2, T=16, seed=4)
    out = {}
    for mode in ("lane0", "both"):
        for par in (2, 0):
            cfg, m = build(PARALLEL_START_LAYER=par, UNET_SKIPS=1, PARALLEL_SKIP=mode)
            perturb(m)
            with torch.no_grad():
                out[mode, par] = m.forward_logits(ids)
    assert not torch.allclose(out["lane0", 2], out["both", 2])
    assert torch.equal(out["lane0", 0], out["both", 0])


@pytest.mark.parametrize("kw", [dict(), dict(VE_ENABLED=1, VE_DIM=0, VALUE_RESIDUAL=1, BIGRAM_HASH=1, TIE_EMBEDDINGS=0, SMEAR_GATE_MODE="v1",
                                         SPARSE_ATTN_GATE=0, GATED_ATTENTION=1),
                                dict(VE_ENABLED=1, VE_DIM=8, VE_GATE="learned", SPARSE_ATTN_GATE=0, ATTN_OUT_GATE=1, SKIP_GATES_ENABLED=0),
                                dict(PARALLEL_START_LAYER=0, NUM_LOOPS=0, UNET_SKIPS=0, SMEAR_GATE=0)])
def test_every_parameter_has_one_declared_role(kw):
    """Optimizer group and quantization class are declared where each parameter is created (no name tables)."""
    m = tg.GPT(make_cfg(**kw))
    roles = tg.param_roles(m)
    assert sorted(roles) == sorted(n for n, _ in m.named_parameters())
    assert all(o in tg.ROLE_OPT and q in tg.ROLE_QUANT for o, q in roles.values())
    groups = tg.param_groups(m)
    assert sum(len(v) for v in groups.values()) == len(roles)
    assert roles["tok_emb.weight"] == ("embed", "tok_emb") and roles["blocks.0.attn.c_q.weight"] == ("muon", "attn")
    assert roles["blocks.0.mlp.fc.weight"] == ("muon", "mlp") and roles["blocks.0.resid_mix"] == ("scalar", "control")
    for name, (opt, _) in roles.items():  # every matrix of a block is Muon's unless it is a gate/control vector
        if name.startswith("blocks.") and name.endswith(".weight") and "ve_table" not in name:
            assert opt == "muon", name
    m.extra = nn.Parameter(torch.zeros(3))  # a parameter added without a role is caught
    with pytest.raises(AssertionError, match="without a declared role.*extra"):
        tg.param_roles(m)


def test_attn_gate_is_one_choice_and_the_old_switches_still_pick_it():
    """ATTN_GATE=sparse|out|gated|none; the old on/off switches (env, grids, artifacts written before) map onto it."""
    cfg = lambda **env: tg.Config.from_env({k: str(v) for k, v in env.items()})  # noqa: E731
    assert cfg().attn_gate == "sparse" and cfg(ATTN_GATE="out").attn_gate == "out"
    for env, want in ((dict(GATED_ATTENTION=1), "gated"), (dict(ATTN_OUT_GATE=1, SPARSE_ATTN_GATE=0), "out"),
                      (dict(GATE_ATTN_OUT=1), "out"), (dict(SPARSE_ATTN_GATE=0), "none"), (dict(SPARSE_ATTN_GATE_ENABLED=0), "none"),
                      (dict(GATED_ATTENTION=0), "sparse"), (dict(SPARSE_ATTN_GATE=1, GATED_ATTENTION=0), "sparse")):
        assert cfg(**env).attn_gate == want, env
    with pytest.raises(tg.ConfigError, match="ATTN_GATE and GATED_ATTENTION set the same option"):
        cfg(ATTN_GATE="out", GATED_ATTENTION=1)
    with pytest.raises(tg.ConfigError, match="ATTN_GATE"):
        cfg(ATTN_GATE="both")
    assert not tg.unknown_knob_warnings({"GATED_ATTENTION": "1", "SPARSE_ATTN_GATE_ENABLED": "0"})
    # an artifact written before ATTN_GATE stores the three switches as bools
    stored = {k: v for k, v in cfg().to_dict().items() if k != "ATTN_GATE"}
    for flags, want in (((False, True, False), "out"), ((False, False, False), "none"), ((False, False, True), "sparse")):
        old = dict(stored, GATED_ATTENTION=flags[0], ATTN_OUT_GATE=flags[1], SPARSE_ATTN_GATE=flags[2])
        assert tg.Config.from_artifact(old)[0].attn_gate == want
    with pytest.raises(tg.ConfigError, match="ATTN_OUT_GATE and SPARSE_ATTN_GATE are alternative"):
        tg.Config.from_artifact(dict(stored, GATED_ATTENTION=False, ATTN_OUT_GATE=True, SPARSE_ATTN_GATE=True))
