"""Phased per-document LoRA TTT (TTT_MODE=phased, record #1855): every target scored exactly once, before any update
that saw it; documents isolated from each other (within a batch and across the schedule); the global SGD phases train
only on scored documents; WORLD_SIZE does not change the result; config defaults = the record; end to end."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import graph_counter
from test_core import ROOT, events, run_train

CPU = torch.device("cpu")
SMALL = dict(TTT_ENABLED="1", TTT_LORA_RANK="4", TTT_DOCS_PER_BATCH="4", TTT_CHUNK_SIZE="16", TTT_EVAL_SEQ_LEN="64",
             PHASED_TTT_PREFIX_DOCS="8", PHASED_TTT_NUM_PHASES="2", GLOBAL_TTT_CHUNK_TOKENS="256", GLOBAL_TTT_BATCH_SEQS="4",
             TTT_LR="0.001", GLOBAL_TTT_LR="0.01",
             NGRAM_TILT_ENABLED="0")  # TTT alone (isolation, references); the tilt's own tests turn it on


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A smoke-shaped model (looping on: adapters per virtual layer) trained a few steps, the val tokens and LUTs."""
    d = tmp_path_factory.mktemp("ttt") / "data"
    cfg = tg.Config.from_env(dict(PRESET="smoke", COMPILE="0", DATA_PATH=str(d), TOKENIZER_PATH=str(d / "sp.model"), **SMALL))
    tg.build_smoke_dataset(cfg.data_path, cfg.tokenizer_path, cfg.vocab_size, log=lambda m: None)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    model.looping_active = True
    opts = tg.Optimizers(model, cfg)
    loader = tg.DistributedLoader(tg.shard_files(cfg.data_path, "train"), 0, 1, cfg.train_batch_tokens, cfg.train_seq_len, CPU, prefetch=0)
    for step in range(15):
        x, y, _ = loader.next()
        model(x, y).backward()
        opts.step(1.0, step)
        opts.zero_grad()
    _, luts = tg.load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    val = torch.from_numpy(tg.load_val_tokens(cfg.data_path, 3000).astype(np.int64))
    return cfg, model.state_dict(), tg.LUTs(luts, CPU), val


def run_phased(setup, tokens=None, **over):
    cfg, sd, luts, val = setup
    c = cfg.replace(**over)
    model = tg.GPT(c)
    model.load_state_dict(sd)
    if c.asym_logit_rescale:  # as load_artifact does
        model.add_asym_softcap()
    model.looping_active = True
    return tg.eval_ttt_phased(model, val if tokens is None else tokens, c, luts, CPU, 0, 1, keep_nll=True), model


def test_documents_cover_every_target_once():
    bos = 1
    toks = torch.tensor([5, 6, 1, 7, 8, 9, 1, 1, 4, 1])  # starts inside a document; an empty document; ends on a BOS
    docs = tg.ttt_documents(toks, bos)
    assert docs == [(0, 3), (2, 5), (6, 2), (7, 3)]
    covered = [t for s, n in docs for t in range(s + 1, s + n)]
    assert covered == list(range(1, len(toks)))
    # chunk windows: the chunks tile the targets, every window ends at its chunk and holds at most W tokens
    for n_pred in (1, 15, 16, 17, 100):
        got = []
        for c in range(-(-n_pred // 16)):
            ws, we, first = tg.ttt_chunk_window(n_pred, c, 16, 40)
            assert 0 <= ws <= first < we <= n_pred and we - ws <= 40
            got += list(range(first, we))
        assert got == list(range(n_pred))


def test_no_updates_equal_isolated_documents(setup):
    """With both learning rates 0, phased TTT scores each document alone: the same NLL as a direct forward over the
    document's own window ending at each chunk (no other document in the context)."""
    cfg, sd, luts, val = setup
    r, model = run_phased(setup, TTT_LR=0.0, GLOBAL_TTT_LR=0.0)
    assert r["tokens"] == len(val) - 1 and not torch.isnan(r["nll"][1:]).any()
    W, C = cfg.ttt_eval_seq_len, cfg.ttt_chunk_size
    ref = torch.empty(len(val), dtype=torch.float64)
    long_docs = 0
    with torch.no_grad():
        for s, n in tg.ttt_documents(val, model.bos_id):
            long_docs += n - 1 > W
            for c in range(-(-(n - 1) // C)):
                ws, we, first = tg.ttt_chunk_window(n - 1, c, C, W)
                nll = model(val[s + ws:s + we][None], val[s + ws + 1:s + we + 1][None], {}, "none")[0].double()
                ref[s + first + 1:s + we + 1] = nll[first - ws:]
    assert long_docs > 0, "the fixture must hold documents longer than the window"
    assert torch.allclose(r["nll"][1:], ref[1:], rtol=1e-5, atol=1e-5)
    loss = ref[1:].mean().item()
    assert r["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert r["phases"] and all(p["steps"] >= 1 for p in r["phases"])


def test_score_first_and_documents_isolated(setup):
    """LoRA learning on, no global phases: changing one token of a document changes no score of its own document
    before that token and none of its batch-mates' or earlier batches'; with TTT_WARM_START_A=0 none of any other
    document either (warm A is the one legal carry-over: a later batch's slot starts from the trained A)."""
    cfg, sd, luts, val = setup
    docs = tg.ttt_documents(val, 1)
    batches, _ = tg.ttt_schedule(docs, cfg.replace(PHASED_TTT_NUM_PHASES=0), 1)
    d = max(range(len(docs)), key=lambda i: docs[i][1])  # the longest document: many chunks, several windows
    s, n = docs[d]
    p = s + n // 2
    val_b = val.clone()
    val_b[p] = (val_b[p] + 7) % cfg.vocab_size if val_b[p] != 1 else 3
    later = [i for b in batches[next(k for k, b in enumerate(batches) if d in b) + 1:] for i in b]
    for warm in (True, False):
        a, _ = run_phased(setup, PHASED_TTT_NUM_PHASES=0, TTT_WARM_START_A=warm)
        b, _ = run_phased(setup, tokens=val_b, PHASED_TTT_NUM_PHASES=0, TTT_WARM_START_A=warm)
        same = torch.ones(len(val), dtype=torch.bool)
        same[p:s + n] = False
        same[0] = False
        if warm:
            for i in later:
                same[docs[i][0] + 1:docs[i][0] + docs[i][1]] = False
        assert torch.allclose(a["nll"][same], b["nll"][same], rtol=0, atol=1e-6), "a score moved that cannot have seen the change"
        assert not torch.allclose(a["nll"][p + cfg.ttt_chunk_size:s + n], b["nll"][p + cfg.ttt_chunk_size:s + n], atol=1e-6)
    # learning happened: scores differ from the no-update run
    z, _ = run_phased(setup, PHASED_TTT_NUM_PHASES=0, TTT_LR=0.0)
    assert a["val_loss"] != z["val_loss"]


@pytest.mark.parametrize("asym", [False, True], ids=["softcap", "asym_logit"])
def test_global_phases_train_only_on_scored_documents(setup, asym):
    """With phases: the document scored last (shortest, last batch) reaches no other score; a prefix document (the
    longest, first batch) reaches the scores of batches after the first phase but none of its own batch-mates'.
    The same with ASYM_LOGIT_RESCALE (its two softcaps are trained by the global phases only)."""
    cfg, sd, luts, val = setup
    cfg = cfg.replace(ASYM_LOGIT_RESCALE=asym)
    setup = (cfg, sd, luts, val)
    a, _ = run_phased(setup, TTT_WARM_START_A=False)
    docs = tg.ttt_documents(val, 1)
    batches, phases = tg.ttt_schedule(docs, cfg, 1)
    assert [b for _, b in phases] == [4, 8] and phases[0][0] == 0

    def changed(doc_index):
        s, n = docs[doc_index]
        v = val.clone()
        v[s + 1] = (v[s + 1] + 5) % cfg.vocab_size if v[s + 1] != 1 else 3
        b, _ = run_phased(setup, tokens=v, TTT_WARM_START_A=False)
        diff = ~torch.isclose(a["nll"], b["nll"], rtol=0, atol=1e-6)
        diff[0] = False
        return {i for i, (s2, n2) in enumerate(docs) if diff[s2 + 1:s2 + n2].any()}

    last = batches[-1][-1]
    assert changed(last) == {last}
    first = batches[0][0]
    hit = changed(first)
    assert first in hit and not (hit & set(batches[0][1:])), "a batch-mate saw the change"
    assert hit & set(sum(batches[1:], [])), "the global phase after batch 0 did not reach later documents"


def test_adapters_start_as_identity_and_rows_are_independent(setup):
    cfg, sd, luts, val = setup
    c = cfg.replace(TTT_TARGETS="q,k,v,o,mlp,proj,up,down,head")
    model = tg.GPT(c)
    model.load_state_dict(sd)
    model.looping_active = True
    ad = tg.TTTAdapters(c, len(tg.layer_order(c, True)), 3, CPU, 0)
    assert len(ad.a) == 8 * len(tg.layer_order(c, True)) + 1
    x = val[:3 * 33].view(3, 33)
    with torch.no_grad():
        base = model(x[:, :-1], x[:, 1:], {}, "none")
        assert torch.equal(model(x[:, :-1], x[:, 1:], {}, "none", ad.weights()), base)  # B = 0: exactly the base model
        for b in ad.b.values():
            b[1].normal_(0, 0.5)  # only document slot 1 moves
        moved = model(x[:, :-1], x[:, 1:], {}, "none", ad.weights())
    assert torch.equal(moved[[0, 2]], base[[0, 2]]) and not torch.allclose(moved[1], base[1])
    with pytest.raises(tg.ConfigError, match="TTT_TARGETS has unknown targets"):
        cfg.replace(TTT_TARGETS="q,attn")


def frozen_model_and_longest_docs(cfg, sd, val):
    """The setup's model with its base weights frozen (as in the phased pass) and the batch of the longest val documents."""
    model = tg.GPT(cfg)
    model.load_state_dict(sd)
    model.looping_active = True
    model.eval()
    tg.freeze_base(model, True)
    return model, sorted(tg.ttt_documents(val, model.bos_id), key=lambda d: -d[1])[:cfg.ttt_docs_per_batch]


def test_padded_rows_and_slot_selection_change_no_score(setup):
    """The compiled path's padding (min_rows: empty rows so that no step has one row) and the prefix-view slot
    selection score and learn exactly as unpadded index_select steps; the warmup runs the scorer on random documents
    and leaves the base weights as they were."""
    cfg, sd, luts, val = setup
    model, docs = frozen_model_and_longest_docs(cfg, sd, val)
    assert len({-(-(n - 1) // cfg.ttt_chunk_size) for _, n in docs}) > 1  # documents end at different steps
    n_virtual = len(tg.layer_order(cfg, True))
    got = []
    for min_rows in (1, cfg.ttt_docs_per_batch):
        ad = tg.TTTAdapters(cfg, n_virtual, cfg.ttt_docs_per_batch, CPU, 5)
        acc, nll = torch.zeros(3, dtype=torch.float64), torch.full((len(val),), float("nan"), dtype=torch.float64)
        tg.ttt_score_batch(model, model, cfg, ad, val, docs, luts, CPU, acc, nll, min_rows=min_rows)
        got.append((acc, nll, {k: v.detach().clone() for k, v in ad.b.items()}))
    (a1, n1, b1), (a2, n2, b2) = got
    assert torch.allclose(a1, a2, rtol=1e-12) and torch.allclose(n1, n2, rtol=1e-9, equal_nan=True)
    assert all(torch.allclose(b1[k], b2[k], atol=1e-7) for k in b1) and any(b.abs().sum() > 0 for b in b1.values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert tg.warm_ttt(model, model, cfg, CPU) >= 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rows_per_forward_and_oom_fallback_give_the_same_scores_and_updates(setup, monkeypatch):
    """TTT_ROWS_PER_FORWARD splits a chunk step's documents over several forward/backward passes and sums the gradients
    before the step: the same scores, n-gram counts and LoRA updates as one pass. With 0 (the default) a CUDA
    out-of-memory error halves the rows per forward and redoes the step: the failed attempt leaves no trace in the
    score, the tilt counts or the gradients."""
    cfg, sd, luts, val = setup
    cfg = cfg.replace(NGRAM_TILT_ENABLED=True, TTT_GRAD_STEPS=2)
    model, docs = frozen_model_and_longest_docs(cfg, sd, val)
    assert len(docs) == 4 and len({-(-(n - 1) // cfg.ttt_chunk_size) for _, n in docs}) > 1
    n_virtual = len(tg.layer_order(cfg, True))

    def score(c, fwd=model):
        ad = tg.TTTAdapters(c, n_virtual, c.ttt_docs_per_batch, CPU, 5)
        tilt = tg.stream_ngram_tilt(val, c, CPU)
        acc, nll = torch.zeros(3, dtype=torch.float64), torch.full((len(val),), float("nan"), dtype=torch.float64)
        tg.ttt_score_batch(fwd, model, c, ad, val, docs, luts, CPU, acc, nll, tilt=tilt)
        return acc, nll, {k: v.detach().clone() for k, v in ad.b.items()}, tilt.stats, ad

    a1, n1, b1, t1, _ = score(cfg)
    for per in (1, 2, 3):
        a2, n2, b2, t2, _ = score(cfg.replace(TTT_ROWS_PER_FORWARD=per))
        assert torch.allclose(a1, a2, rtol=1e-9) and torch.allclose(n1, n2, rtol=1e-7, equal_nan=True) and torch.equal(t1[:3], t2[:3])
        assert all(torch.allclose(b1[k], b2[k], atol=1e-6) for k in b1) and any(b.abs().sum() > 0 for b in b1.values())
    calls = {"n": 0}

    def tight_memory(*args, **kw):  # a forward of more than 2 rows "runs out of memory" (once the step has scored a part)
        calls["n"] += 1
        if args[0].size(0) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return model(*args, **kw)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    a3, n3, b3, t3, ad = score(cfg, fwd=tight_memory)
    assert ad.rows_per_forward <= 2 and ad.oom_splits and calls["n"] > 0
    assert torch.allclose(a1, a3, rtol=1e-9) and torch.allclose(n1, n3, rtol=1e-7, equal_nan=True) and torch.equal(t1[:3], t3[:3])
    assert all(torch.allclose(b1[k], b3[k], atol=1e-6) for k in b1)
    with pytest.raises(tg.ConfigError, match="TTT_ROWS_PER_FORWARD"):
        cfg.replace(TTT_ROWS_PER_FORWARD=-1)


def test_config_defaults_are_record_1855():
    c = tg.Config.from_env({})
    assert (c.ttt_enabled, c.ttt_mode, c.ttt_lora_rank, c.ttt_lora_alpha, c.ttt_lr, c.ttt_beta1, c.ttt_beta2, c.ttt_weight_decay) == \
        (True, "phased", 80, 144.0, 1e-4, 0.0, 0.99, 0.5)
    assert (c.ttt_docs_per_batch, c.ttt_chunk_size, c.ttt_eval_seq_len, c.phased_ttt_prefix_docs, c.phased_ttt_num_phases) == (64, 48, 2048, 2500, 3)
    assert (c.global_ttt_lr, c.global_ttt_momentum, c.global_ttt_chunk_tokens, c.global_ttt_batch_seqs, c.global_ttt_grad_clip) == (1e-3, 0.9, 32768, 32, 1.0)
    assert c.ttt_targets == "q,k,v,o,mlp,head" and c.ttt_warm_start_a
    assert not c.sliding_eval, "with TTT as the final metric the sliding pass is off unless asked for"
    assert tg.Config.from_env({"TTT_ENABLED": "0"}).sliding_eval and tg.Config.from_env({"SLIDING_EVAL": "1"}).sliding_eval
    assert not tg.Config.from_env({"PRESET": "smoke"}).ttt_enabled
    assert tg.Config.from_env({"TTT_BATCH_SIZE": "32", "TTT_LORA_LR": "2e-4"}).ttt_docs_per_batch == 32  # the records' names
    for bad, msg in (({"TTT_MODE": "slot"}, "TTT_MODE"), ({"TTT_CHUNK_SIZE": "0"}, "TTT_CHUNK_SIZE=0"),
                     ({"TTT_EVAL_SEQ_LEN": "32", "TTT_CHUNK_SIZE": "48"}, "TTT_EVAL_SEQ_LEN=32"), ({"TTT_BETA2": "1.0"}, "TTT_BETA2"),
                     ({"TTT_TARGETS": "", "PHASED_TTT_NUM_PHASES": "0"}, "TTT_TARGETS is empty")):
        with pytest.raises(tg.ConfigError, match=msg):
            tg.Config.from_env(bad)
    assert {"TTT_MODE", "PHASED_TTT_PREFIX_DOCS", "GLOBAL_TTT_LR", "TTT_DOCS_PER_BATCH"} <= tg.EVAL_OVERRIDABLE


def test_end_to_end_phased_and_world_size(tmp_path):
    """train_gpt.py trains the smoke model; --eval-only runs phased TTT on 1 and on 2 processes (gloo) to the same
    score (A drawn per batch, phase boundary on a round boundary), and chunked TTT; progress and phase lines appear."""
    r = run_train(tmp_path, dict(PRESET="smoke", RUN_ID="base", VAL_MAX_TOKENS="3000"))
    assert r.returncode == 0, r.stderr[-3000:]
    art = str(tmp_path / "runs" / "base" / "final_model.ptz")
    ev = dict(PRESET="smoke", SLIDING_EVAL="0", VAL_MAX_TOKENS="3000", **dict(SMALL, TTT_WARM_START_A="0", PHASED_TTT_NUM_PHASES="1"))
    one = run_train(tmp_path, dict(ev, RUN_ID="one"), args=("--eval-only", art))
    two = run_train(tmp_path, dict(ev, RUN_ID="two"), nproc=2, args=("--eval-only", art))
    chunked = run_train(tmp_path, dict(ev, RUN_ID="chunked", TTT_MODE="chunked", TTT_CHUNK_TOKENS="512", EVAL_SEQ_LEN="64", EVAL_STRIDE="32"),
                        args=("--eval-only", art))
    for x in (one, two, chunked):
        assert x.returncode == 0, x.stdout[-2000:] + x.stderr[-3000:]
    s1, s2, sc = (json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("one", "two", "chunked"))
    assert s1["final_metric"] == "ttt" and s1["config"]["TTT_MODE"] == "phased" and sc["config"]["TTT_MODE"] == "chunked"
    assert s1["ttt_val_bpb"] == pytest.approx(s2["ttt_val_bpb"], rel=2e-5)
    assert s1["ttt_docs"] == s2["ttt_docs"] > 8 and len(s1["ttt_phases"]) == 1
    assert s1["eval_seconds"] >= s1["ttt_seconds"] > 0
    assert events(one.stdout, "ttt_warmup") and events(one.stdout, "ttt_phase") and events(one.stdout, "ttt_progress")
    prog = events(one.stdout, "ttt_progress")[-1]
    assert prog["docs_done"] == prog["docs"] and {"running_bpb", "elapsed_s", "projected_s"} <= set(prog)
    assert s1["ttt_val_bpb"] < s1["quant_val_bpb"] - 0.01, "phased TTT should adapt the smoke model to its val docs"
    assert abs(sc["ttt_val_bpb"] - sc["quant_val_bpb"]) < 0.2

    # bench/bench_ttt.py on the same artifact: the three modes score the same targets; --reproject redoes the projection
    bench = [sys.executable, str(ROOT / "bench" / "bench_ttt.py"), art, "--data-path", str(tmp_path / "data" / "datasets" / "smoke_sp512"),
             "--tokenizer", str(tmp_path / "data" / "datasets" / "smoke_sp512" / "smoke_sp512.model"),
             *sum((["--set", f"{k}={v}"] for k, v in dict(SMALL, VAL_MAX_TOKENS="3000", TTT_CHUNK_TOKENS="512").items()), [])]
    b = subprocess.run(bench + ["--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-2000:]
    res = json.loads((tmp_path / "b" / "bench_ttt.json").read_text())
    assert set(res["modes"]) == {"none", "chunked", "phased"} and len({m["tokens"] for m in res["modes"].values()}) == 1
    pj = res["projection"]
    assert pj["local_steps"] > 0 and pj["sp8192"]["steps"] > pj["local_steps"] and pj["sp8192"]["lora_s_by_steps"] > 0
    b2 = subprocess.run(bench + ["--out", str(tmp_path / "b2"), "--reproject", str(tmp_path / "b" / "bench_ttt.json")],
                        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert b2.returncode == 0, b2.stderr[-2000:]
    assert json.loads((tmp_path / "b2" / "bench_ttt.json").read_text())["projection"]["sp8192"] == pj["sp8192"]


@pytest.mark.parametrize("duck_shape", [False, True])
def test_compiled_ttt_forward_does_not_recompile_after_warmup(setup, duck_shape):
    """After warm_ttt, the phased pass meets new row counts and window lengths and must not compile again (on the GPU a
    recompile of the 17-layer forward+backward costs minutes inside the eval timer). A counting backend on the CPU sees
    the same dynamo guards. With 64 LoRA slots the first window is 64 tokens: under duck sizing (the old compile) the
    two sizes share one symbol and the second window length recompiles; compile_ttt turns that off."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config
    cfg, sd, luts, val = setup
    cfg = cfg.replace(ttt_docs_per_batch=64, ttt_eval_seq_len=128, phased_ttt_num_phases=0)
    model = tg.GPT(cfg)
    model.load_state_dict(sd)
    model.looping_active = True
    counting, graphs = graph_counter()

    torch._dynamo.reset()
    old = fx_config.use_duck_shape
    try:
        if duck_shape:  # the pre-fix compile: what the recompile looked like
            fx_config.use_duck_shape = True
            fwd = torch.compile(model, dynamic=True, backend=counting)
        else:
            fwd = tg.compile_ttt(model, backend=counting)
        tg.warm_ttt(fwd, model, cfg, CPU)
        warm_graphs = len(graphs)
        tg.eval_ttt_phased(model, val, cfg, luts, CPU, 0, 1, fwd=fwd)
    finally:
        fx_config.use_duck_shape = old
        torch._dynamo.reset()
    if duck_shape:  # as on the H200: the warmup's second window length already recompiled
        assert len(graphs) > 1, "the duck-sized compile should recompile (else this test no longer shows the bug)"
    else:
        assert warm_graphs == 1, f"the warmup compiled {warm_graphs} graphs (one dynamic graph expected)"
        assert len(graphs) == 1, f"the phased pass compiled {len(graphs) - warm_graphs} new graph(s) after the warmup"


# ---- post-deadline levers: AsymLogit (PR #1923/#1945), TTT_LOCAL_LR_MULT and TTT_MASK (PR #1953) -------------------

def test_asym_softcap_at_init_is_the_plain_softcap(setup):
    """c+ = c- = LOGIT_SOFTCAP at creation: the same logits and loss as the plain softcap; the two caps act on the
    positive / negative logits as c tanh(z / c) with their own c; made at artifact load only (never stored)."""
    cfg, sd, luts, val = setup
    model = tg.GPT(cfg)
    model.load_state_dict(sd)
    model.looping_active = True
    x = val[:2 * 65].view(2, 65)
    with torch.no_grad():
        plain = model.forward_logits(x[:, :-1])
        model.add_asym_softcap()
        assert model.asym_softcap.tolist() == [cfg.logit_softcap] * 2
        assert torch.equal(model.forward_logits(x[:, :-1]), plain)
        h = model.hidden(x[:, :-1])
        z = tg.F.linear(h, model.tok_emb.weight).float()
        model.asym_softcap.copy_(torch.tensor([3.0, 40.0]))
        ref = torch.where(z >= 0, 3.0 * torch.tanh(z / 3.0), 40.0 * torch.tanh(z / 40.0))
        assert torch.allclose(model.logits_from_hidden(h), ref, rtol=1e-6, atol=1e-6)
    assert "asym_softcap" not in tg.GPT(cfg).state_dict()
    with pytest.raises(tg.ConfigError, match="ASYM_LOGIT_RESCALE"):
        cfg.replace(ASYM_LOGIT_RESCALE=True, LOGIT_SOFTCAP=0.0)
    assert {"ASYM_LOGIT_RESCALE", "TTT_MASK", "TTT_LOCAL_LR_MULT"} <= tg.EVAL_OVERRIDABLE


def test_asym_softcap_trained_only_by_global_sgd(setup, monkeypatch):
    """The per-document LoRA batches never move (c+, c-); every global SGD phase does; the ttt_phase stats carry the
    values after their phase. With GLOBAL_TTT_LR=0 the whole pass scores exactly as without AsymLogit."""
    seen = []

    def watch(fn, kind):
        def wrapped(fwd, model, *a, **k):
            before = model.asym_softcap.detach().clone()
            out = fn(fwd, model, *a, **k)
            seen.append((kind, before, model.asym_softcap.detach().clone()))
            return out
        return wrapped

    monkeypatch.setattr(tg, "ttt_score_batch", watch(tg.ttt_score_batch, "lora"))
    monkeypatch.setattr(tg, "ttt_global_sgd", watch(tg.ttt_global_sgd, "sgd"))
    short = setup[3][:600]  # 10 documents: 3 batches, a global phase after each of the first two
    r, model = run_phased(setup, tokens=short, ASYM_LOGIT_RESCALE=True, GLOBAL_TTT_LR=0.05)
    assert [k for k, *_ in seen].count("sgd") == len(r["phases"]) == 2 and [k for k, *_ in seen].count("lora") == 3
    for kind, before, after in seen:
        assert torch.equal(before, after) != (kind == "sgd"), kind
    sgd_after = [after for kind, _, after in seen if kind == "sgd"]
    for p, after in zip(r["phases"], sgd_after):
        assert (p["softcap_pos"], p["softcap_neg"]) == tuple(after.tolist())
    monkeypatch.undo()
    plain, _ = run_phased(setup, tokens=short, GLOBAL_TTT_LR=0.0)
    frozen, m2 = run_phased(setup, tokens=short, ASYM_LOGIT_RESCALE=True, GLOBAL_TTT_LR=0.0)
    assert m2.asym_softcap.tolist() == [setup[0].logit_softcap] * 2
    assert torch.allclose(frozen["nll"], plain["nll"], rtol=0, atol=1e-6, equal_nan=True) and "softcap_pos" not in plain["phases"][0]


def test_ttt_local_lr_mult_and_mask(setup):
    """TTT_LOCAL_LR_MULT scales the LoRA AdamW LR only (the global SGD keeps GLOBAL_TTT_LR): TTT_LR=a with the
    multiplier m scores exactly as TTT_LR=a*m. TTT_MASK=no_qv is TTT_TARGETS without q and v."""
    cfg, sd, luts, val = setup
    c = cfg.replace(TTT_LOCAL_LR_MULT=0.75)
    assert tg.ttt_adamw(c, [torch.zeros(2, requires_grad=True)], CPU).param_groups[0]["lr"] == cfg.ttt_lr * 0.75
    short = val[:600]
    a, _ = run_phased(setup, tokens=short, TTT_LOCAL_LR_MULT=0.75)
    b, _ = run_phased(setup, tokens=short, TTT_LR=cfg.ttt_lr * 0.75)
    assert a["phases"], "a global phase runs: a multiplier that reached GLOBAL_TTT_LR would show"
    assert torch.equal(a["nll"].nan_to_num(), b["nll"].nan_to_num())

    m = cfg.replace(TTT_MASK="no_qv")
    assert m.ttt_target_list == ["k", "o", "mlp", "head"] and cfg.ttt_target_list == ["q", "k", "v", "o", "mlp", "head"]
    # the same adapters (names, shapes, A draws) as the explicit list: the TTT pass is then the same computation
    ad, explicit = tg.TTTAdapters(m, 3, 2, CPU, 0), tg.TTTAdapters(cfg.replace(TTT_TARGETS="k,o,mlp,head"), 3, 2, CPU, 0)
    assert sorted({k.split(".")[-1] for k in ad.a}) == ["head", "k", "mlp", "o"] and list(ad.a) == list(explicit.a)
    assert all(torch.equal(ad.a[k], explicit.a[k]) and ad.b[k].shape == explicit.b[k].shape for k in ad.a)
    for bad, msg in (({"TTT_MASK": "no_qv", "TTT_TARGETS": "q,v"}, "TTT_MASK=no_qv leaves no LoRA target"),
                     ({"TTT_MASK": "qv"}, "TTT_MASK"), ({"TTT_LOCAL_LR_MULT": "-1"}, "TTT_LOCAL_LR_MULT")):
        with pytest.raises(tg.ConfigError, match=msg):
            tg.Config.from_env(bad)
    d = tg.Config.from_env({})
    assert (d.ttt_mask, d.ttt_local_lr_mult, d.asym_logit_rescale, d.awq_lite_enabled) == ("none", 1.0, False, False)


def test_end_to_end_awq_lite_and_asym_logit(tmp_path):
    """The smoke pipeline with AWQ-lite (on the int7 tied embedding, groups of 16 of its 64 columns) and AsymLogit with
    phased TTT: event:awq_lite, a pgq-state-v2 artifact without the softcaps, and (c+, c-) in every ttt_phase."""
    env = dict(PRESET="smoke", RUN_ID="levers", VAL_MAX_TOKENS="3000", EMBED_BITS="7", AWQ_LITE_ENABLED="1", AWQ_LITE_GROUP_SIZE="16",
               ASYM_LOGIT_RESCALE="1", SLIDING_EVAL="0", **dict(SMALL, PHASED_TTT_NUM_PHASES="1"))
    r = run_train(tmp_path, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (awq,) = events(r.stdout, "awq_lite")
    assert awq["tensors"] == "1" and awq["columns"] == "16" and int(awq["extra_bytes_raw"]) == 512 * 16 // 8
    tensors, meta = tg.deserialize_state((tmp_path / "runs" / "levers" / "final_model.ptz").read_bytes())
    assert meta["format"] == "pgq-state-v2" and meta["tensors"]["tok_emb.weight"]["awq"]["group_size"] == 16
    assert not any("softcap" in k for k in tensors)
    phases = events(r.stdout, "ttt_phase")
    assert phases and all({"softcap_pos", "softcap_neg"} <= set(p) for p in phases)
    from test_contract import documented_events
    docs = documented_events()
    for kv in (awq, *phases):  # the new keys are the documented ones (docs/FORMATS.md)
        ev = "awq_lite" if kv is awq else "ttt_phase"
        assert any(req <= set(kv) <= req | opt for req, opt in docs[ev]), (ev, sorted(kv))
    s = json.loads((tmp_path / "runs" / "levers" / "summary.json").read_text())
    # (one phase at GLOBAL_TTT_LR=0.01 moves c+ / c- below one float32 step of 30 on this model: values only)
    assert s["final_metric"] == "ttt" and all(math.isfinite(p["softcap_pos"]) and math.isfinite(p["softcap_neg"]) for p in s["ttt_phases"])
