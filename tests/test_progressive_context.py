"""Progressive training context (TRAIN_SEQ_SCHEDULE, PR #2014), eval context longer than training (EVAL_SEQ_LEN), and
short-document TTT chunks (TTT_CHUNK_SCHEDULE): parsing and validation, the loader's rows per phase, the trainer's
switch points and LR re-warm, the compile warmup plan (no graph compiled in the timed loop), off = unchanged, and the
chunk schedule's score-first coverage."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import graph_counter
from test_ttt import run_phased, setup  # noqa: F401  (the smoke-model fixture of the TTT tests)

CPU = torch.device("cpu")
TINY = dict(VOCAB_SIZE="64", NUM_LAYERS="4", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="4", LOOP_START="1",
            LOOP_END="2", NUM_LOOPS="1", PARALLEL_START_LAYER="3", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="384", EVAL_SEQ_LEN="64", TTT_EVAL_SEQ_LEN="64", DOC_ATTENTION="0",
            EVAL_STRIDE="16", COMPILE="0", GRAD_ACCUM_STEPS="1", MAX_WALLCLOCK_SECONDS="0", GPTQ_RESERVE_SECONDS="0",
            ITERATIONS="20", WARMUP_STEPS="1", TRAIN_LOG_EVERY="1", PREFETCH_BATCHES="2", ENABLE_LOOPING_AT="0.5")
SCHED = "64@0,128@0.25,192@0.5"  # 384 tokens per step: 6, 3, 2 rows


def tiny(**kw):
    return tg.Config.from_env(dict(TINY, **{k: str(v) for k, v in kw.items()}))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: two intra-op threads on a busy 2-core CI machine made a step 20x slower than one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Events(list):
    def __call__(self, event, **kv):
        self.append((event, kv))

    def of(self, name):
        return [kv for e, kv in self if e == name]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Random tokens with a BOS (id 1) about every 24 tokens: documents for DOC_ATTENTION."""
    rng = np.random.default_rng(0)
    toks = rng.integers(2, 64, 60000)
    toks[rng.random(60000) < 1 / 24] = 1
    path = tmp_path_factory.mktemp("pc") / "fineweb_train_000000.bin"
    tg.write_shard(path, toks)
    return [str(path)]


def make_trainer(shard, cfg, seed=0):
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    log = Events()
    return tg.Trainer(cfg, model, CPU, 0, 1, shard, log), log


# -- config --------------------------------------------------------------------------------------

def test_schedules_parse_and_bad_values_raise():
    c = tg.Config.from_env(dict(TRAIN_SEQ_SCHEDULE="1024@0, 2048@0.1,3072@0.7", TTT_CHUNK_SCHEDULE="256:8,2000:24",
                                EVAL_SEQ_LEN="3072", TTT_EVAL_SEQ_LEN="3072"))
    assert c.train_seq_phases() == ((1024, 0.0), (2048, 0.1), (3072, 0.7)) and c.max_train_seq_len == 3072
    assert [c.train_seq_len_at(f) for f in (0, 0.0999, 0.1, 0.69, 0.7, 1.0)] == [1024, 1024, 2048, 2048, 3072, 3072]
    assert [c.ttt_chunk_for(n) for n in (2, 256, 257, 2000, 2001)] == [8, 8, 24, 24, 48] and c.ttt_chunk_sizes() == [8, 24, 48]
    assert tg.Config.from_env({}).train_seq_phases() == ((2048, 0.0),) and tg.Config.from_env({}).ttt_chunk_sizes() == [48]
    assert c.rope_table_len == 3072 and tg.GPT(tiny(TRAIN_SEQ_SCHEDULE=SCHED)).blocks[0].attn.rotary.cos_table.size(1) == 192
    assert c.batch_split_error(8, 1) is None and "3072=9216" in c.batch_split_error(3, 1)
    bad = [(dict(TRAIN_SEQ_SCHEDULE="1024:0"), "expected LEN@FRAC"), (dict(TRAIN_SEQ_SCHEDULE="1024@0,x@0.5"), "expected LEN@FRAC"),
           (dict(TRAIN_SEQ_SCHEDULE="1000@0"), "multiples of 64"), (dict(TRAIN_SEQ_SCHEDULE="0@0"), "multiples of 64"),
           (dict(TRAIN_SEQ_SCHEDULE="1024@0.1,2048@0.5"), "start at fraction 0"),
           (dict(TRAIN_SEQ_SCHEDULE="1024@0,2048@0.5,3072@0.5"), "must increase"), (dict(TRAIN_SEQ_SCHEDULE="1024@0,2048@1"), "below 1"),
           (dict(TRAIN_SEQ_SCHEDULE="1024@0,1024@0.5"), "same length"),
           (dict(TRAIN_SEQ_SCHEDULE="1024@0,1280@0.5"), r"multiple of every length \(not of \[1280\]\)"),
           (dict(SEQ_CHANGE_WARMUP_STEPS="-1"), "SEQ_CHANGE_WARMUP_STEPS=-1"),
           (dict(TTT_CHUNK_SCHEDULE="256-8"), "expected MAXLEN:CHUNK"), (dict(TTT_CHUNK_SCHEDULE="2000:24,256:8"), "increase"),
           (dict(TTT_CHUNK_SCHEDULE="256:0"), "chunk sizes must be in 1..TTT_EVAL_SEQ_LEN"),
           (dict(TTT_CHUNK_SCHEDULE="256:4096"), "chunk sizes must be in 1..TTT_EVAL_SEQ_LEN"),
           (dict(TTT_CHUNK_SCHEDULE="256:8", TTT_MODE="chunked"), "TTT_MODE=phased only")]
    for env, msg in bad:
        with pytest.raises(tg.ConfigError, match=msg):
            tg.Config.from_env(env)
    # with a schedule TRAIN_SEQ_LEN is no row length: it need not divide the batch
    assert tg.Config.from_env(dict(TRAIN_SEQ_SCHEDULE="1536@0,3072@0.5", TRAIN_BATCH_TOKENS="73728", TRAIN_SEQ_LEN="2048"))
    with pytest.raises(tg.ConfigError, match="WORLD_SIZE\\*GRAD_ACCUM_STEPS\\*the TRAIN_SEQ_SCHEDULE length 192=576"):
        tg.Trainer(tiny(TRAIN_SEQ_SCHEDULE=SCHED, GRAD_ACCUM_STEPS="3"), tg.GPT(tiny()), CPU, 0, 1, [], Events())


# -- loader --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_rows_follow_set_seq_len_and_stream_is_unchanged(shard, prefetch):
    """Each phase's batches are [local/L, L] (one packed row with DOC_ATTENTION, cu_seqlens cut at the new length),
    batches prepared before the change included; the tokens are those of a loader that never changes length."""
    for doc in (None, (1, 64)):
        ref = tg.DistributedLoader(shard, 0, 1, 384, 64, CPU, prefetch=0, doc=doc)
        ld = tg.DistributedLoader(shard, 0, 1, 384, 64, CPU, prefetch=prefetch, doc=doc)
        try:
            for L in (64, 128, 192, 64):
                ld.set_seq_len(L)
                for _ in range(3):
                    x, y, cu = ld.next()
                    rx, ry, _ = ref.next()
                    assert x.shape == ((1, 384) if doc else (384 // L, L)) and x.numel() == 384
                    assert torch.equal(x.flatten(), rx.flatten()) and torch.equal(y.flatten(), ry.flatten())
                    if doc:
                        assert torch.equal(cu, torch.from_numpy(tg.doc_cu_seqlens(x.numpy(), 1, L)))
                        assert int(cu.diff().max()) <= L
                    else:
                        assert cu is None
        finally:
            ld.close()


# -- trainer -------------------------------------------------------------------------------------

def test_trainer_switches_at_the_fractions_with_constant_tokens(shard):
    cfg = tiny(TRAIN_SEQ_SCHEDULE=SCHED, SEQ_CHANGE_WARMUP_STEPS="2", WARMUP_STEPS="0")
    tr, log = make_trainer(shard, cfg)
    shapes, lrs = [], []
    fwd, opt_step = tr.fwd, tr.opts.step
    tr.fwd = lambda x, y, m: (shapes.append(tuple(x.shape)), fwd(x, y, m))[1]
    tr.opts.step = lambda lr_mul, step, progress=0.0: (lrs.append(lr_mul), opt_step(lr_mul, step, progress))[1]
    tr.train(None)
    ev = log.of("seq_len")
    assert [(e["step"], e["seq_len"], e["rows"]) for e in ev] == [(0, 64, 6), (5, 128, 3), (10, 192, 2)]  # frac = step / 20
    assert shapes == [(6, 64)] * 5 + [(3, 128)] * 5 + [(2, 192)] * 10 and {a * b for a, b in shapes} == {384}
    base = [tg.lr_multiplier(cfg, s / 20, s, 0, 0) for s in range(20)]
    rewarm = {5: 0.5, 10: 0.5}  # 1/N at a change, back to 1 after N = 2 steps
    assert lrs == pytest.approx([b * rewarm.get(s, 1.0) for s, b in enumerate(base)])
    assert log.of("layer_loop")[0]["step"] == 10


def test_schedule_off_and_one_phase_schedule_train_identically(shard):
    """Off (TRAIN_SEQ_LEN throughout) is the code path of before; a one-phase schedule at the same length gives the
    same losses bit for bit (the schedule machinery itself changes nothing), DOC_ATTENTION included."""
    for doc in ("0", "1"):
        runs = []
        for extra in ({}, dict(TRAIN_SEQ_SCHEDULE="64@0")):
            tr, log = make_trainer(shard, tiny(DOC_ATTENTION=doc, ITERATIONS="8", **extra), seed=3)
            tr.warmup()
            tr.train(None)
            runs.append([e["loss"] for e in log.of("train")])
        assert len(runs[0]) == 8 and runs[0] == runs[1]
        assert log.of("seq_len") == [dict(step=0, seq_len=64, rows=1 if doc == "1" else 6, frac=0.0)]


def reachable(cfg, n=4000):
    """The (length, looping, grown) variants of the timed loop at fractions 0, 1/n, ..., as Trainer.train decides them."""
    loop_at = cfg.enable_looping_at if cfg.num_loops > 0 else float("inf")
    grow_at = cfg.grow_at_frac if cfg.grow_layers_from else 0.0
    return {(cfg.train_seq_len_at(k / n), k / n >= loop_at, k / n >= grow_at) for k in range(n)}


S3 = "1024@0,2048@0.1,3072@0.7"


@pytest.mark.parametrize("env", [{}, dict(ENABLE_LOOPING_AT="0"), dict(NUM_LOOPS="0"), dict(TRAIN_SEQ_SCHEDULE=S3),
                                 dict(TRAIN_SEQ_SCHEDULE=S3, ENABLE_LOOPING_AT="0.05"), dict(TRAIN_SEQ_SCHEDULE=S3, ENABLE_LOOPING_AT="0.1"),
                                 dict(TRAIN_SEQ_SCHEDULE="1024@0,3072@0.5", ENABLE_LOOPING_AT="1.0"),
                                 dict(TRAIN_SEQ_SCHEDULE=S3, NUM_LOOPS="0", GROW_LAYERS_FROM="6", GROW_AT_FRAC="0.4")])
def test_warmup_plan_is_every_reachable_variant(env):
    cfg = tg.Config.from_env(env)
    plan = tg.train_warmup_plan(cfg)
    assert len(plan) == len(set(plan)) and set(plan) >= reachable(cfg)
    assert set(plan) <= reachable(cfg) | {(3072, True, True)}  # ENABLE_LOOPING_AT=1.0: the last step may still switch
    if not env:
        assert plan == [(2048, False, True), (2048, True, True)]  # as before the schedule: both loop modes
    if "GROW_LAYERS_FROM" in env:
        assert plan == [(1024, False, False), (2048, False, False), (2048, False, True), (3072, False, True)]


def fake_varlen(q, k, v, cu, max_seqlen, window=0):
    """A varlen kernel stand-in (segments from cu_seqlens, dense SDPA): its graph depends on cu's length and
    max_seqlen as FlashAttention's varlen entry does."""
    pos = torch.arange(q.size(0))
    seg = torch.searchsorted(cu, pos, right=True)
    m = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < max_seqlen)
    t = lambda z: z.transpose(0, 1)[None]
    return F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=m, enable_gqa=k.size(1) != q.size(1))[0].transpose(0, 1)


@pytest.mark.parametrize("doc,control", [("0", False), ("1", False), ("0", True)])
def test_compile_warmup_leaves_nothing_to_compile_in_the_timed_loop(shard, doc, control, monkeypatch):
    """A counting torch.compile backend (the dynamo guards of the GPU run, on the CPU): after Trainer.warmup the timed
    loop, which meets three lengths and the loop switch, compiles no graph. DOC_ATTENTION=1 runs a varlen stand-in, so
    the cut length (one graph per length) and cu_seqlens' padded size (dynamic) reach the graph. Control: a warmup of
    the first variant only leaves the timed loop compiling (the counting backend sees what the GPU run would)."""
    import torch._dynamo
    cfg = tiny(TRAIN_SEQ_SCHEDULE=SCHED, DOC_ATTENTION=doc, ITERATIONS="14", ENABLE_LOOPING_AT="0.6")
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    if doc == "1":
        model.set_kernels(dataclasses.replace(model.kernels, varlen=fake_varlen))
    counting, graphs = graph_counter()

    torch._dynamo.reset()
    try:
        log = Events()
        tr = tg.Trainer(cfg, model, CPU, 0, 1, shard, log)
        tr.fwd = torch.compile(model, dynamic=False, backend=counting)
        plan = [(64, False, True), (128, False, True), (192, False, True), (192, True, True)]
        assert tg.train_warmup_plan(cfg) == plan
        if control:
            monkeypatch.setattr(tg, "train_warmup_plan", lambda c: plan[:1])
        tr.warmup()
        warm = len(graphs)
        tr.train(None)
        if control:
            assert len(graphs) >= warm + 3, "the control should compile the three variants it did not warm"
            return
        assert warm >= len(plan)
        assert len(graphs) == warm, f"the timed loop compiled {len(graphs) - warm} graph(s)"
        assert [e["seq_len"] for e in log.of("seq_len")] == [64, 128, 192] and log.of("layer_loop")
        w = log.of("warmup")[0]
        assert w["steps_run"] == len(plan) and w["plan"] == "64/off,128/off,192/off,192/on"
        if doc == "1":  # a micro-batch with more documents: the next cu_seqlens bucket (Kernels.masks marks it dynamic)
            x, y, cu = tg.DistributedLoader(shard, 0, 1, 384, 192, CPU, prefetch=0, doc=(1, 192)).next()
            tr.forward_backward(x, y, torch.cat([cu, cu[-1:].expand(len(cu))]), 1)
            assert len(graphs) == warm, "a new cu_seqlens length compiled"
    finally:
        torch._dynamo.reset()


# -- eval context --------------------------------------------------------------------------------

def test_eval_context_longer_than_training(shard):
    """EVAL_SEQ_LEN (and TTT_EVAL_SEQ_LEN) above TRAIN_SEQ_LEN: RoPE tables cover it, the windowed eval scores every
    target once, and an artifact's eval can raise it (--eval-only env) with the tables rebuilt."""
    cfg = tiny(EVAL_SEQ_LEN="192", EVAL_STRIDE="32", TTT_EVAL_SEQ_LEN="256", TTT_CHUNK_SIZE="16")
    model = tg.GPT(cfg)
    assert model.blocks[0].attn.rotary.cos_table.size(1) == 256
    toks = torch.from_numpy(tg.load_shard(shard[0])[:1000].astype(np.int64))
    luts = tg.LUTs((np.ones(64, np.int64), np.zeros(64, bool), np.zeros(64, bool)), CPU)
    loss, bpb, n, nb = tg.evaluate(model, model, toks, 192, 32, 4, luts, CPU, 0, 1)
    assert n == len(toks) - 1 == nb and np.isfinite(loss)
    ref = tg.evaluate(model, model, toks, 192, 192, 4, luts, CPU, 0, 1)
    assert ref[2] == n
    stored = tiny().to_dict()
    c2, ignored = tg.Config.from_artifact(stored, {"EVAL_SEQ_LEN": "3072", "TTT_EVAL_SEQ_LEN": "3072"})
    assert not ignored and c2.eval_seq_len == 3072 and tg.GPT(c2).blocks[0].attn.rotary.cos_table.size(1) == 3072


# -- TTT chunk schedule ----------------------------------------------------------------------------

CHUNKS = "40:4,120:8"  # the smoke fixture's documents: chunk 4 up to 40 tokens, 8 up to 120, TTT_CHUNK_SIZE=16 beyond


def test_chunk_schedule_scores_every_target_once_with_its_chunk(setup):  # noqa: F811
    """No learning: each document's targets are scored once each, from the window of its own chunk size."""
    cfg, sd, luts, val = setup
    r, model = run_phased(setup, TTT_LR=0.0, GLOBAL_TTT_LR=0.0, TTT_CHUNK_SCHEDULE=CHUNKS)
    assert r["tokens"] == len(val) - 1 and not torch.isnan(r["nll"][1:]).any()
    c = cfg.replace(TTT_CHUNK_SCHEDULE=CHUNKS)
    W, ref, sizes = c.ttt_eval_seq_len, torch.full((len(val),), float("nan"), dtype=torch.float64), set()
    with torch.no_grad():
        for s, n in tg.ttt_documents(val, model.bos_id):
            C = c.ttt_chunk_for(n - 1)
            sizes.add(C)
            for k in range(-(-(n - 1) // C)):
                ws, we, first = tg.ttt_chunk_window(n - 1, k, C, W)
                assert torch.isnan(ref[s + first + 1:s + we + 1]).all(), "a target scored twice"
                ref[s + first + 1:s + we + 1] = model(val[s + ws:s + we][None], val[s + ws + 1:s + we + 1][None], {}, "none")[0].double()[first - ws:]
    assert sizes == {4, 8, 16}, "the fixture must hold documents of every class"
    assert torch.allclose(r["nll"][1:], ref[1:], rtol=1e-5, atol=1e-5)
    assert r["chunk_docs"] == ",".join(f"{k}={v}" for k, v in sorted(
        {C: sum(c.ttt_chunk_for(n - 1) == C for _, n in tg.ttt_documents(val, 1)) for C in sizes}.items()))


def test_chunk_schedule_is_score_first(setup):  # noqa: F811
    """Learning on: changing one token of a short (chunk 4) document moves no score of that document before the token
    (its chunk included: scored before the update that saw it) and none of any other document."""
    cfg, sd, luts, val = setup
    docs = tg.ttt_documents(val, 1)
    d = max((i for i, (_, n) in enumerate(docs) if n - 1 <= 40), key=lambda i: docs[i][1])
    s, n = docs[d]
    assert n - 1 > 16
    p = s + 10  # target 9 of the document: chunk 2 (targets 8..11), scored after the updates on chunks 0 and 1
    val_b = val.clone()
    val_b[p] = 5 if val_b[p] != 5 else 6  # never a BOS: the documents stay the same
    kw = dict(PHASED_TTT_NUM_PHASES=0, TTT_WARM_START_A=False, TTT_CHUNK_SCHEDULE=CHUNKS)
    a, _ = run_phased(setup, **kw)
    b, _ = run_phased(setup, tokens=val_b, **kw)
    same = torch.ones(len(val), dtype=torch.bool)
    same[0] = False
    same[p:s + n] = False  # the changed target, later inputs of its chunk (attention) and later chunks (updates too)
    assert torch.allclose(a["nll"][same], b["nll"][same], rtol=0, atol=1e-6), "a score moved that cannot have seen the change"
    assert not torch.allclose(a["nll"][s + 13:s + n], b["nll"][s + 13:s + n], atol=1e-6)


def test_chunk_schedule_off_or_uniform_is_unchanged(setup):  # noqa: F811
    """A schedule that gives every document TTT_CHUNK_SIZE scores exactly as no schedule (same slot order, same steps)."""
    cfg, sd, luts, val = setup
    a, _ = run_phased(setup)
    b, _ = run_phased(setup, TTT_CHUNK_SCHEDULE=f"100000:{cfg.ttt_chunk_size}")
    assert a["val_loss"] == b["val_loss"] and torch.equal(torch.nan_to_num(a["nll"]), torch.nan_to_num(b["nll"]))


def test_warm_ttt_covers_every_chunk_class_and_nothing_recompiles(setup):  # noqa: F811
    """compile_ttt's dynamic forward (counting backend) warmed by warm_ttt with a chunk schedule: the phased pass over
    documents of every class compiles nothing more."""
    import torch._dynamo
    cfg, sd, luts, val = setup
    cfg = cfg.replace(ttt_docs_per_batch=8, ttt_eval_seq_len=128, phased_ttt_num_phases=0, ttt_chunk_schedule=CHUNKS)
    docs = tg.ttt_documents(val, 1)
    pick = [next(i for i, (_, n) in enumerate(docs) if lo < n - 1 <= hi) for lo, hi in ((0, 40), (40, 120), (120, 10 ** 9))]
    pick += [i for i in range(len(docs)) if i not in pick][:4]  # one batch of 7 documents, every class in it
    val = torch.cat([val[docs[i][0]:docs[i][0] + docs[i][1] - 1] for i in pick] + [torch.tensor([1])])
    model = tg.GPT(cfg)
    model.load_state_dict(sd)
    model.looping_active = True
    counting, graphs = graph_counter()
    seen = []

    torch._dynamo.reset()
    score = tg.ttt_score_batch
    try:
        tg.ttt_score_batch = lambda fwd, m, c, ad, t, docs, *a, **k: (seen.extend(c.ttt_chunk_for(n - 1) for _, n in docs), score(fwd, m, c, ad, t, docs, *a, **k))[1]
        fwd = tg.compile_ttt(model, backend=counting)
        tg.warm_ttt(fwd, model, cfg, CPU)
        assert set(seen) == {4, 8, 16}, "warm_ttt must run a document of every chunk size"
        warm = len(graphs)
        assert warm == 1, f"the warmup compiled {warm} graphs (one dynamic graph expected)"
        tg.eval_ttt_phased(model, val, cfg, luts, CPU, 0, 1, fwd=fwd)
    finally:
        tg.ttt_score_batch = score
        torch._dynamo.reset()
    assert len(graphs) == warm, f"the phased pass compiled {len(graphs) - warm} new graph(s) after the warmup"
