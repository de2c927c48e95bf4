"""Token-only n-gram tilt at evaluation (NGRAM_TILT_ENABLED, PR #2135): the hints against a brute-force reference (stream
order and the phased-TTT document layout), legality (a target's hint never depends on itself or on anything scored after
it), the tilted distribution is normalized and matches the closed form, every eval path applies it exactly once per
target, off changes nothing, WORLD_SIZE 1 and 2 agree end to end."""
import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import graph_counter
from test_core import events, run_train, tiny_cfg
from test_ttt import SMALL, run_phased, setup  # noqa: F401  (the phased fixture: a trained smoke model + val)

CPU = torch.device("cpu")


def ref_hints(t, order, thr, seg=None, cut=None):
    """The definition, by brute force: the longest context with a visible earlier occurrence decides."""
    N = len(t)
    seg = seg or [0] * N
    hint, has = [0] * N, [False] * N
    for i in range(N):
        if i <= seg[i]:
            continue
        vis = [j for j in range(N) if j > seg[j] and ((j < i) if cut is None else (j < cut[i] or (seg[j] == seg[i] and j < i)))]
        for k in range(min(order, i - seg[i]), 0, -1):
            conts = [t[j] for j in vis if j - k >= seg[j] and t[j - k:j] == t[i - k:i]]
            if conts:
                tok, n = Counter(conts).most_common(1)[0]
                if n >= thr * len(conts):
                    hint[i], has[i] = tok, True
                break
    return hint, has


def doc_layout(rng, n_docs, V):
    """Documents (BOS first) in batches of 1..3, as phased_ngram_tilt lays them out: (tokens, seg, cut)."""
    t, seg, cut, left = [], [], [], n_docs
    while left:
        b = rng.randint(1, min(3, left))
        left -= b
        b0 = len(t)
        for _ in range(b):
            s = len(t)
            doc = [1] + [rng.randrange(2, V) for _ in range(rng.randint(1, 11))]
            t += doc
            seg += [s] * len(doc)
            cut += [b0] * len(doc)
    return t, seg, cut


def hints(t, order, thr, seg=None, cut=None):
    as_t = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
    h, s = tg.ngram_hints(torch.tensor(t), order, thr, as_t(seg), as_t(cut))
    return h.tolist(), s.tolist()


def test_hints_match_brute_force():
    rng = random.Random(0)
    n_hint = 0
    for trial in range(240):
        V, order, thr = rng.choice([3, 4, 6]), rng.choice([1, 2, 3, 5, 16]), rng.choice([0.51, 0.6, 0.8, 1.0])
        if trial % 2:
            t, seg, cut = [rng.randrange(V) for _ in range(rng.randint(1, 60))], None, None
        else:
            t, seg, cut = doc_layout(rng, rng.randint(1, 8), V)
        h, s = hints(t, order, thr, seg, cut)
        rh, rs = ref_hints(t, order, thr, seg, cut)
        assert s == rs and [a for a, f in zip(h, s) if f] == [a for a, f in zip(rh, rs) if f], (trial, t, seg, cut, order, thr)
        n_hint += sum(s)
    assert n_hint > 500, "the cases must exercise the hints"
    assert hints([5], 16, 0.8) == ([0], [False]) and hints([], 4, 0.8) == ([], [])


def test_hints_never_read_the_target_or_later_tokens():
    """Stream order: changing token p changes no hint at positions <= p (a token never reaches its own score). Phased
    layout: changing a token of document d changes hints only in d after it and in documents of LATER batches (never a
    batch-mate's, an earlier batch's or its own earlier ones)."""
    rng = random.Random(1)
    t = [rng.randrange(4) for _ in range(90)]
    base = hints(t, 16, 0.8)
    assert sum(base[1]) > 20
    for p in range(len(t)):
        u = list(t)
        u[p] = (u[p] + 1 + rng.randrange(3)) % 4
        h, s = hints(u, 16, 0.8)
        assert h[:p + 1] == base[0][:p + 1] and s[:p + 1] == base[1][:p + 1], p
    for trial in range(6):
        t, seg, cut = doc_layout(rng, 9, 4)
        base = hints(t, 16, 0.6, seg, cut)
        changed_any = False
        for p in range(len(t)):
            u = list(t)
            u[p] = 2 + (u[p] - 2 + 1) % 2 if u[p] != 1 else 1  # a BOS stays a BOS (the layout is fixed)
            h, s = hints(u, 16, 0.6, seg, cut)
            may = [(seg[i] == seg[p] and i > p) or cut[i] > cut[p] for i in range(len(t))]
            for i in range(len(t)):
                if not may[i]:
                    assert (h[i] if s[i] else None) == (base[0][i] if base[1][i] else None) and s[i] == base[1][i], (trial, p, i)
                changed_any |= s[i] != base[1][i] or (s[i] and h[i] != base[0][i])
        assert changed_any or trial, "the perturbations must move some hint"


def test_tilt_is_a_normalized_distribution_and_matches_the_closed_form():
    torch.manual_seed(0)
    V, T, B = 50, 400, 2.625
    logits = torch.randn(T, V, dtype=torch.float64) * 3
    y, h = torch.randint(0, V, (T,)), torch.randint(0, V, (T,))
    y[::3] = h[::3]  # many hits
    has = torch.rand(T) < 0.7
    nll = F.cross_entropy(logits, y, reduction="none")
    nll_h = torch.logsumexp(logits, -1) - logits.gather(-1, h[:, None])[:, 0]
    tilt = tg.NgramTilt(h, has, B)
    pos = torch.arange(T)
    got = tilt.apply(nll, nll_h, y, pos, torch.ones(T, dtype=torch.bool))
    # the tilted distribution itself: softmax(logits + B * onehot(h)) where a hint exists
    tilted_logits = logits + B * F.one_hot(h, V).double() * has[:, None]
    p = torch.softmax(tilted_logits, -1)
    assert torch.allclose(p.sum(-1), torch.ones(T, dtype=torch.float64), atol=1e-12) and (p > 0).all()
    assert torch.allclose(got, -torch.log(p.gather(-1, y[:, None])[:, 0]), atol=1e-10)
    assert torch.equal(got[~has], nll[~has])
    n, tilted, hits, saved = tilt.stats.tolist()
    assert (n, tilted, hits) == (T, has.sum().item(), (has & (y == h)).sum().item()) and saved == pytest.approx((nll - got).sum().item())
    # B = 0 leaves every score bit-identical
    assert torch.equal(tg.NgramTilt(h, has, 0.0).apply(nll, nll_h, y, pos, torch.ones(T, dtype=torch.bool)), nll)
    # the model's forward returns -log p(hint) from the same logits; without a hint it is unchanged
    cfg = tiny_cfg()
    model = tg.GPT(cfg).eval()
    for q in model.parameters():
        q.data.add_(torch.randn_like(q) * 0.05)
    x = torch.randint(0, 64, (2, 33))
    hx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        plain = model(x[:, :-1], x[:, 1:], None, "none")
        a, b = model(x[:, :-1], x[:, 1:], None, "none", None, hint=hx)
        lg = model.forward_logits(x[:, :-1])
    assert torch.equal(a, plain)
    assert torch.allclose(b, F.cross_entropy(lg.reshape(-1, 64), hx.reshape(-1), reduction="none").view(2, 32), atol=1e-5)


def repetitive_tokens(n, V, seed=0):
    """Random tokens with repeated phrases: plenty of hints, right and wrong."""
    g = torch.Generator().manual_seed(seed)
    phrases = [torch.randint(2, V, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g) for _ in range(12)]
    out = []
    while sum(len(o) for o in out) < n:
        out.append(phrases[int(torch.randint(0, 12, (1,), generator=g))] if torch.rand(1, generator=g) < 0.7
                   else torch.randint(2, V, (4,), generator=g))
    return torch.cat(out)[:n]


def test_stream_evals_tilt_each_target_once():
    """Roundtrip (stride = L) and sliding eval with the tilt = a direct per-target reference (each target scored once
    from its own window, tilted by the closed form); boost 0 = no tilt, bit for bit; the stats count every target."""
    torch.manual_seed(0)
    cfg = tiny_cfg(NGRAM_TILT_ENABLED=1)
    model = tg.GPT(cfg).eval()
    for q in model.parameters():
        q.data.add_(torch.randn_like(q) * 0.05)
    toks = repetitive_tokens(300, 64)
    luts = tg.LUTs((np.ones(64, dtype=np.int64), np.zeros(64, dtype=bool), np.zeros(64, dtype=bool)), CPU)
    tilt = tg.stream_ngram_tilt(toks, cfg, CPU)
    assert 0.2 < tilt.has.float().mean() < 0.95 and tilt.seconds > 0
    L, build_s = 32, tilt.seconds
    for stride in (32, 8):
        a = tg.evaluate(model, model, toks, L, stride, 4, luts, CPU, 0, 1, tilt)
        s = tilt.summary("x", a[0], a[1], 1)
        ref, hit = torch.zeros(len(toks), dtype=torch.float64), 0
        with torch.no_grad():
            for st, n in tg.eval_windows(len(toks), L, stride):
                ln = min(L, len(toks) - 1)
                x, y = toks[st:st + ln], toks[st + 1:st + ln + 1]
                nll, nh = model(x[None], y[None], None, "none", None, hint=tilt.hint[st + 1:st + ln + 1][None])
                nll, nh = nll[0, ln - n:].double(), nh[0, ln - n:].double()
                on, hh = tilt.has[st + ln - n + 1:st + ln + 1], tilt.hint[st + ln - n + 1:st + ln + 1]
                tgt = y[ln - n:]
                hit += int((on & (tgt == hh)).sum())
                ref[st + ln - n + 1:st + ln + 1] = torch.where(on, nll - cfg.ngram_token_boost * (tgt == hh) +
                                                               torch.log1p(torch.exp(-nh) * math.expm1(cfg.ngram_token_boost)), nll)
        assert a[2] == len(toks) - 1 and a[0] == pytest.approx(ref[1:].mean().item(), rel=1e-9)
        assert (s["tokens"], s["tilted"]) == (len(toks) - 1, int(tilt.has[1:].sum())) and s["hit_rate"] == pytest.approx(hit / s["tilted"])
        assert s["seconds"] == (build_s if stride == 32 else 0.0)  # the build time is charged once
        off = tg.evaluate(model, model, toks, L, stride, 4, luts, CPU, 0, 1)
        zero = tg.evaluate(model, model, toks, L, stride, 4, luts, CPU, 0, 1, tg.NgramTilt(tilt.hint, tilt.has, 0.0))
        assert zero == off and a[0] != off[0]
        assert s["gain_bpb"] == pytest.approx(off[1] - a[1], rel=1e-6)


def test_phased_ttt_tilt_scores_and_legality(setup):  # noqa: F811
    """Phased TTT with the tilt: with no learning, a target's score moves from its untilted one only where the phased
    layout has a hint, within the closed form's bounds; with LoRA learning on (no phases: the n-gram is then the only
    path between documents), changing one token of a document moves no score of its batch-mates, of earlier batches or
    of its own document before it."""
    cfg, sd, luts, val = setup
    val = val[:1400]
    plain, _ = run_phased(setup, tokens=val, TTT_LR=0.0, PHASED_TTT_NUM_PHASES=0, NGRAM_TILT_ENABLED=False)
    tilted, _ = run_phased(setup, tokens=val, TTT_LR=0.0, PHASED_TTT_NUM_PHASES=0, NGRAM_TILT_ENABLED=True)
    c = cfg.replace(PHASED_TTT_NUM_PHASES=0, NGRAM_TILT_ENABLED=True)
    docs = tg.ttt_documents(val, 1)
    batches, _ = tg.ttt_schedule(docs, c, 1)
    assert len(batches) >= 3
    tilt = tg.phased_ngram_tilt(val, docs, batches, c, CPU)
    st = tilted["ngram_tilt"]
    assert st["tokens"] == len(val) - 1 and st["tilted"] == int(tilt.has.sum()) > 20 and st["seconds"] > 0
    same = ~tilt.has
    same[0] = False
    assert torch.equal(tilted["nll"][same], plain["nll"][same]) and tilted["val_loss"] != plain["val_loss"]
    # -log p'(y) - (-log p(y)) = -B [y = h] + log(1 + p(h)(e^B - 1)), the log term in (0, B)
    d = (tilted["nll"] - plain["nll"])[tilt.has]
    hit = (val == tilt.hint)[tilt.has]
    B = c.ngram_token_boost
    assert (d[hit] > -B - 1e-9).all() and (d[hit] < 1e-9).all() and (d[~hit] > -1e-9).all() and (d[~hit] < B).all()

    a, _ = run_phased(setup, tokens=val, PHASED_TTT_NUM_PHASES=0, TTT_WARM_START_A=False, NGRAM_TILT_ENABLED=True)
    bidx = {i: k for k, b in enumerate(batches) for i in b}
    d_i = batches[1][1]  # a batch-mate before it, earlier and later batches
    s, n = docs[d_i]
    p = s + n // 2
    v = val.clone()
    v[p] = (v[p] + 7) % cfg.vocab_size if v[p] != 1 else 3
    b, _ = run_phased(setup, tokens=v, PHASED_TTT_NUM_PHASES=0, TTT_WARM_START_A=False, NGRAM_TILT_ENABLED=True)
    may = torch.zeros(len(val), dtype=torch.bool)
    may[p:s + n] = True
    may[0] = True
    for i, (s2, n2) in enumerate(docs):
        if bidx[i] > bidx[d_i]:
            may[s2 + 1:s2 + n2] = True
    assert torch.allclose(a["nll"][~may], b["nll"][~may], rtol=0, atol=1e-6), "a score moved that cannot have seen the change"
    assert not torch.allclose(a["nll"][may], b["nll"][may], rtol=0, atol=1e-6)


def test_config_validation():
    c = tg.Config.from_env({})
    assert (c.ngram_tilt_enabled, c.ngram_token_order, c.ngram_token_threshold, c.ngram_token_boost) == (True, 16, 0.8, 2.625)
    for bad, msg in (({"NGRAM_TOKEN_ORDER": "0"}, "NGRAM_TOKEN_ORDER=0"), ({"NGRAM_TOKEN_THRESHOLD": "0.5"}, "NGRAM_TOKEN_THRESHOLD"),
                     ({"NGRAM_TOKEN_THRESHOLD": "1.1"}, "NGRAM_TOKEN_THRESHOLD"), ({"NGRAM_TOKEN_BOOST": "-1"}, "NGRAM_TOKEN_BOOST")):
        with pytest.raises(tg.ConfigError, match=msg):
            tg.Config.from_env(bad)
    assert {"NGRAM_TILT_ENABLED", "NGRAM_TOKEN_ORDER", "NGRAM_TOKEN_THRESHOLD", "NGRAM_TOKEN_BOOST"} <= tg.EVAL_OVERRIDABLE


def test_compiled_ttt_forward_with_tilt_does_not_recompile(setup):  # noqa: F811
    """The warmup also warms the forward that takes the hints: the tilted phased pass compiles nothing new."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config
    cfg, sd, luts, val = setup
    cfg = cfg.replace(phased_ttt_num_phases=0, ngram_tilt_enabled=True)
    model = tg.GPT(cfg)
    model.load_state_dict(sd)
    model.looping_active = True
    counting, graphs = graph_counter()

    torch._dynamo.reset()
    old = fx_config.use_duck_shape
    try:
        fwd = tg.compile_ttt(model, backend=counting)
        tg.warm_ttt(fwd, model, cfg, CPU)
        warm = len(graphs)
        r = tg.eval_ttt_phased(model, val[:1000], cfg, luts, CPU, 0, 1, fwd=fwd)
    finally:
        fx_config.use_duck_shape = old
        torch._dynamo.reset()
    assert warm == 1 and len(graphs) == 1 and r["ngram_tilt"]["tilted"] > 0


def test_end_to_end_world_size_1_and_2(tmp_path):
    """--eval-only with NGRAM_TILT_ENABLED=1: phased TTT on 1 and 2 processes (gloo) gives the same score and the same
    tilt counts; the roundtrip and chunked passes log event:ngram_tilt too; off logs none and scores as before."""
    r = run_train(tmp_path, dict(PRESET="smoke", RUN_ID="base", VAL_MAX_TOKENS="3000", SLIDING_EVAL="0", NGRAM_TILT_ENABLED="0"))
    assert r.returncode == 0, r.stderr[-3000:]
    base = json.loads((tmp_path / "runs" / "base" / "summary.json").read_text())
    assert not events(r.stdout, "ngram_tilt")
    art = str(tmp_path / "runs" / "base" / "final_model.ptz")
    ev = dict(PRESET="smoke", SLIDING_EVAL="0", VAL_MAX_TOKENS="3000",
              **dict(SMALL, TTT_WARM_START_A="0", PHASED_TTT_NUM_PHASES="1", NGRAM_TILT_ENABLED="1"))
    one = run_train(tmp_path, dict(ev, RUN_ID="one"), args=("--eval-only", art))
    two = run_train(tmp_path, dict(ev, RUN_ID="two"), nproc=2, args=("--eval-only", art))
    chunked = run_train(tmp_path, dict(ev, RUN_ID="chunked", TTT_MODE="chunked", TTT_CHUNK_TOKENS="512", EVAL_SEQ_LEN="64", EVAL_STRIDE="32"),
                        args=("--eval-only", art))
    for x in (one, two, chunked):
        assert x.returncode == 0, x.stdout[-2000:] + x.stderr[-3000:]
    s1, s2 = (json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("one", "two"))
    assert s1["ttt_val_bpb"] == pytest.approx(s2["ttt_val_bpb"], rel=2e-5)
    e1, e2, ec = (events(x.stdout, "ngram_tilt") for x in (one, two, chunked))
    assert [e["name"] for e in e1] == ["roundtrip", "ttt"] and [e["name"] for e in ec] == ["roundtrip", "ttt"]
    assert [(e["tokens"], e["tilted"]) for e in e1] == [(e["tokens"], e["tilted"]) for e in e2]
    assert int(e1[1]["tokens"]) == s1["val_tokens"] and int(e1[1]["tilted"]) > 0 and float(e1[0]["seconds"]) > 0
    assert s1["quant_val_bpb"] != base["quant_val_bpb"]
    # the roundtrip's plain score (summary + event) is the untilted pass: the same as with the tilt off
    assert s1["quant_plain_val_bpb"] == pytest.approx(base["quant_val_bpb"], abs=1e-9) == base["quant_plain_val_bpb"]
    assert float(events(one.stdout, "roundtrip")[0]["plain_val_bpb"]) == pytest.approx(s1["quant_plain_val_bpb"], abs=1e-6)
    assert s1["eval_seconds"] >= s1["ttt_seconds"] > 0
