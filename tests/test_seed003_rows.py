"""The rows of seed 003 (PR #1125) that needed new switches (issue 16): XSA gating (#41), the baseline's int8 clip
percentile + zlib (#31), int6 QAT (#37), progressive layer growing (#38) and depth recurrence with per-loop LoRA (#39).
Each: the math against an independent reference (tests/feature_ref.py or plain torch here), and the switch off =
today's behaviour, bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
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
