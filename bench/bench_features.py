#!/usr/bin/env python3
"""Per-feature training-step cost of train_gpt.py, relative to the base config, in ONE process; plus
an attention microbenchmark ("are S-window layers really cheaper at seq 2048?").

Rows: base, then one env delta per row (see ROWS), then base again (drift / noise check). Each row:
Config.from_env(base env + delta) -> GPT -> Trainer; `--warm` untimed + `--steps` timed optimizer steps
(synchronize per step), median/mean ms per step, delta vs base, peak memory; then everything is freed
(del, gc, torch.cuda.empty_cache, and torch._dynamo.reset() in compile mode).

Defaults keep GPU time low: `--compile 0` = eager model (no per-row recompile), GRAD_ACCUM_STEPS=1 and
TRAIN_BATCH_TOKENS=49152 (one 24x2048 micro-batch per step; eager at 48x2048 OOMs on 80 GB) or 98304
with --compile 1 (48x2048 = what one of 8 GPUs does per step). The Muon step here updates ALL
matrices (on 8 GPUs each rank does 1/8 of them), so matrix-adding features look a bit dearer. In eager mode
FlexAttention (WINDOW_PATTERN with S, DOC_ATTENTION) is patched to torch.compile(flex_attention),
since eager flex materializes the full score matrix and is not what a compiled run executes.
`--looping on` (default) times the looped forward (65% of a default run); rows with NUM_LOOPS=0 then
show what looping costs. Env precedence: script defaults < --tiny < process env < --set < row delta.

Attention microbenchmark: fwd+bwd of one attention call [B=48, T=2048, H=8, Hkv=4, D=64] bf16:
SDPA causal (auto backend, forced flash / cuDNN / efficient, flash on expanded KV), SDPA with a dense
window mask, FlexAttention (torch.compile'd) causal / sliding window 1024 / 512 (mask q-kv <= w, as in
train_gpt), median of --attn-iters.

  python3 bench/bench_features.py --out /tmp/feat                  # H100, eager, ~3-4 min
  python3 bench/bench_features.py --tiny --out /tmp/b2             # CPU test
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

tg = C.tg
warnings.filterwarnings("ignore", message=".*Profiler clears events")

ROWS: list[tuple[str, dict[str, str]]] = [
    ("base", {}),
    ("windows_SSSL", {"WINDOW_PATTERN": "SSSL"}),
    ("kv_heads_8", {"NUM_KV_HEADS": "8"}),
    ("kv_heads_2", {"NUM_KV_HEADS": "2"}),
    ("kv_heads_1", {"NUM_KV_HEADS": "1"}),
    ("head_dim_128", {"HEAD_DIM": "128"}),
    ("ve_shared_128", {"VE_ENABLED": "1", "VE_DIM": "128"}),
    ("ve_full_tables", {"VE_ENABLED": "1", "VE_DIM": "0"}),
    ("value_residual", {"VALUE_RESIDUAL": "1"}),
    ("gated_attention", {"ATTN_GATE": "gated"}),
    ("attn_out_gate", {"ATTN_GATE": "out"}),
    ("sparse_attn_gate_off", {"ATTN_GATE": "none"}),
    ("xsa_off", {"XSA_LAST_N": "0"}),
    ("rope_all_dims", {"ROPE_DIMS": "0"}),
    ("shared_head_dim_16", {"SHARED_HEAD_DIM": "16"}),
    ("softcap_off", {"LOGIT_SOFTCAP": "0"}),
    ("smear_gate_off", {"SMEAR_GATE": "0"}),
    ("smear_gate_v1", {"SMEAR_GATE_MODE": "v1"}),
    ("bigram_hash", {"BIGRAM_HASH": "1"}),
    ("loops_off", {"NUM_LOOPS": "0"}),
    ("parallel_off", {"PARALLEL_START_LAYER": "0"}),
    ("doc_attention", {"DOC_ATTENTION": "1"}),
    ("ln_scale_off", {"LN_SCALE": "0"}),
    ("base_again", {}),
]
# One micro-batch per step. Eager keeps every intermediate: 98304 tokens (48 x 2048) peaks at ~75 GiB
# with looping on and OOMs on an 80 GB H100 for most rows, so eager mode uses 24 x 2048 tokens.
FEATURE_DEFAULTS = {0: dict(TRAIN_BATCH_TOKENS="49152", GRAD_ACCUM_STEPS="1"), 1: dict(TRAIN_BATCH_TOKENS="98304", GRAD_ACCUM_STEPS="1")}
TINY_FEATURE = dict(TRAIN_BATCH_TOKENS="256", GRAD_ACCUM_STEPS="1")


def apply_delta(env: dict[str, str], delta: dict[str, str]) -> dict[str, str]:
    """env + delta, dropping aliases of the delta's options (else Config refuses two spellings)."""
    out = dict(env)
    for k, v in delta.items():
        canon = tg.ALIASES.get(k, k)
        for key in [e for e in out if tg.ALIASES.get(e, e) == canon]:
            del out[key]
        out[k] = v
    return out


def graphs_compiled() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return -1


def run_row(name, delta, env, device, files, args, compile_mode: bool, looping: bool) -> dict:
    row = dict(name=name, delta=delta)
    try:
        cfg = tg.Config.from_env(apply_delta(env, delta), warn=lambda m: None)
    except tg.ConfigError as e:
        row.update(status="skipped", reason=str(e))
        return row
    trainer = model = None
    try:
        torch.manual_seed(cfg.seed)
        model = tg.GPT(cfg, 1).to(device)
        trainer = tg.Trainer(cfg, model, device, 0, 1, files, lambda *a, **k: None)
        model.looping_active = looping and cfg.num_loops > 0
        C.free_memory(device)
        C.reset_peak(device)
        t0 = time.perf_counter()
        for i in range(args.warm):
            trainer.step(i, 1.0)
        C.sync(device)
        warm_s = time.perf_counter() - t0
        g0 = graphs_compiled()
        times = C.time_steps(lambda i: trainer.step(i, 1.0), args.steps, device)
        g1 = graphs_compiled()
        st = C.stats_ms(times)
        row.update(status="ok", ms_median=st["median"], ms_mean=st["mean"], ms_min=st["min"], ms_stdev=st["stdev"],
                   tok_s=trainer.local_tokens * trainer.accum / (st["median"] / 1000), warm_s=warm_s,
                   peak_mem_gib=C.peak_gib(device), params=sum(p.numel() for p in model.parameters()),
                   looping=int(model.looping_active), graphs_compiled_while_timed=(g1 - g0) if g0 >= 0 else None)
    except Exception as e:  # OOM or a broken feature: record it and go on with the next row
        row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc()
    finally:
        if trainer is not None:
            trainer.loader.close()
        del trainer, model
        C.free_memory(device)
        if compile_mode:
            torch._dynamo.reset()
    return row


# ---------------------------------------------------------------------------------------------
# Attention microbenchmark
# ---------------------------------------------------------------------------------------------
def sdpa_backend_name(fn, q, k, v) -> str:
    """Which aten SDPA kernel a call dispatches to (from a CPU-side profile of one forward)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(q, k, v)
    names = [e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and e.key != "aten::scaled_dot_product_attention"]
    return ",".join(sorted(set(names))) or "unknown"


def attn_bench(device, B, T, H, Hkv, D, windows, iters, warm, flex_compile: bool, out) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask
    import torch.nn.attention.flex_attention as fa
    flex = getattr(fa, "_bench_original_flex_attention", fa.flex_attention)
    flex_fn = torch.compile(flex, dynamic=False) if flex_compile else flex
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
    go = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
    gqa = Hkv != H
    def bthd_leaf(x):  # the same values laid out [B, T, H, D] contiguous (as the model hands them to flash-attn), as a BHTD view
        return x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()

    q_t, k_t, v_t = (bthd_leaf(x) for x in (q, k, v))

    def forced(backend):
        def f(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return f

    def expand_flash(q, k, v):
        r = H // Hkv
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True)

    def window_mod(w):
        def mask_mod(b, h, qi, kv):
            m = qi >= kv
            return m & (qi - kv <= w) if w else m
        return mask_mod

    def flex_case(w):
        bm = create_block_mask(window_mod(w), None, None, T, T, device=device)
        return lambda q, k, v: flex_fn(q, k, v, block_mask=bm, enable_gqa=gqa)

    def flash_case(ffn, w):
        def f(q, k, v):  # BHTD in and out, like SDPA; the transposes are views, the copies are made up front
            out = ffn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, window_size=(w, 0) if w else (-1, -1))
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
        f.bthd = True
        return f

    def window_mask(w):  # [T, T] boolean, True = attend: causal, and q - kv <= w when w > 0
        i = torch.arange(T, device=device)
        m = i[:, None] >= i[None, :]
        return m & (i[:, None] - i[None, :] <= w) if w else m

    def dense_mask_case(w):
        m = window_mask(w)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)

    def errors_vs_fp32(fn, qq, kk_, vv, w, nb=2):
        """Max |difference| of out, dq, dk, dv from an fp32 math-SDPA reference on the first nb sequences
        (the same inputs): a wrong window, scale or GQA mapping shows up here, not just as a speed."""
        m = window_mask(w)
        leaves = [x.detach()[:nb].clone().requires_grad_() for x in (qq, kk_, vv)]
        if getattr(fn, "bthd", False):
            leaves = [bthd_leaf(x) for x in leaves]
        out = fn(*leaves)
        out.backward(go[:nb])
        ref = [x.detach()[:nb].float().requires_grad_() for x in (qq, kk_, vv)]
        r = H // Hkv
        with sdpa_kernel([SDPBackend.MATH]):
            ref_out = F.scaled_dot_product_attention(ref[0], ref[1].repeat_interleave(r, 1), ref[2].repeat_interleave(r, 1), attn_mask=m)
        ref_out.backward(go[:nb].float())
        errs = {"err_out": (out.float() - ref_out).abs().max().item()}
        for name, a, b in zip(("err_dq", "err_dk", "err_dv"), leaves, ref):
            errs[name] = (a.grad.float() - b.grad).abs().max().item()
        return errs

    cases = [("sdpa_causal_auto", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), 0)]
    if cuda:
        cases += [("sdpa_causal_flash", forced(SDPBackend.FLASH_ATTENTION), 0),
                  ("sdpa_causal_cudnn", forced(SDPBackend.CUDNN_ATTENTION), 0),
                  ("sdpa_causal_efficient", forced(SDPBackend.EFFICIENT_ATTENTION), 0),
                  ("sdpa_causal_flash_expand_kv", expand_flash, 0)]
    cases += [(f"sdpa_dense_mask_w{windows[0]}", dense_mask_case(windows[0]), windows[0]), ("flex_causal", None, 0)]
    cases += [(f"flex_w{w}", None, w) for w in windows]
    flash_fns = {}  # flash-attn kernels take [B, T, H, D]: timed on their own contiguous copies
    if cuda and tg._flash_attn_func is not None:
        flash_fns[tg.FLASH_ATTN] = tg._flash_attn_func
    fa4_fn = tg.fa4_attention() if cuda else None
    if fa4_fn is not None:
        flash_fns["fa4"] = fa4_fn
    for kind, ffn in flash_fns.items():
        cases += [(f"{kind}_causal" if w == 0 else f"{kind}_w{w}", flash_case(ffn, w), w) for w in [0] + windows]
    fwd_only_flex = not cuda  # FlexAttention has no CPU backward

    res = dict(shape=dict(B=B, T=T, H=H, Hkv=Hkv, D=D), dtype=str(dtype).replace("torch.", ""), iters=iters, warm=warm,
               flex_compiled=flex_compile, cases={})
    try:
        res["sdpa_auto_kernel"] = sdpa_backend_name(cases[0][1], q.detach(), k.detach(), v.detach())
    except Exception as e:
        res["sdpa_auto_kernel"] = f"unknown ({type(e).__name__})"
    out("attn_env", shape=f"B{B}_T{T}_H{H}_Hkv{Hkv}_D{D}", dtype=res["dtype"], flex_compiled=int(flex_compile),
        sdpa_auto_kernel=res["sdpa_auto_kernel"])
    for name, fn, w in cases:
        is_flex = name.startswith("flex")
        fwd_only = is_flex and fwd_only_flex
        with warnings.catch_warnings():  # forced SDPA backends warn at length when they refuse
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            try:
                if fn is None:
                    fn = flex_case(w)

                qq, kk_, vv = (q_t, k_t, v_t) if getattr(fn, "bthd", False) else (q, k, v)

                def once():
                    if fwd_only:
                        with torch.no_grad():
                            fn(qq.detach(), kk_.detach(), vv.detach())
                        return
                    qq.grad = kk_.grad = vv.grad = None
                    fn(qq, kk_, vv).backward(go)
                for _ in range(warm):
                    once()
                C.sync(device)
                setup_s = time.perf_counter() - t0
                times = []
                for _ in range(iters):
                    if cuda:
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        once()
                        e1.record()
                        torch.cuda.synchronize(device)
                        times.append(e0.elapsed_time(e1))
                    else:
                        s = time.perf_counter()
                        once()
                        times.append(1000 * (time.perf_counter() - s))
                ms = statistics.median(times)
                kavg = C.avg_keys(T, w)
                flops = (4 if fwd_only else 12) * B * T * kavg * H * D
                r = dict(status="ok", ms=ms, ms_min=min(times), pass_="fwd" if fwd_only else "fwd+bwd", window=w, k_avg=kavg,
                         tflops=flops / (ms / 1000) / 1e12, setup_s=setup_s)
                if not fwd_only:
                    r.update(errors_vs_fp32(fn, qq, kk_, vv, w))
            except Exception as e:
                r = dict(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", window=w)
        res["cases"][name] = r
        out("attn", case=name, **{("pass" if kk == "pass_" else kk): vv for kk, vv in r.items()})
    cs = res["cases"]

    def ratio(a, b):
        if cs.get(a, {}).get("status") == "ok" and cs.get(b, {}).get("status") == "ok":
            return cs[a]["ms"] / cs[b]["ms"]
        return None
    sp = {}
    for w in windows:
        sp[f"flex_causal_over_flex_w{w}"] = ratio("flex_causal", f"flex_w{w}")
        sp[f"sdpa_auto_over_flex_w{w}"] = ratio("sdpa_causal_auto", f"flex_w{w}")
        sp[f"ideal_k_ratio_w{w}"] = C.avg_keys(T, 0) / C.avg_keys(T, w)
    sp["flex_causal_over_sdpa_auto"] = ratio("flex_causal", "sdpa_causal_auto")
    for kind in flash_fns:  # > 1 = the flash-attn kernel is faster than what SDPA picks
        sp[f"sdpa_auto_over_{kind}_causal"] = ratio("sdpa_causal_auto", f"{kind}_causal")
    res["speedups"] = sp
    out("attn_speedup", **sp)
    del q, k, v, go
    C.free_memory(device)
    return res


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VAL", help="base env override for every row")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--compile", type=int, default=0, choices=(0, 1), help="0 = eager model (default), 1 = torch.compile per row (slow: recompiles)")
    ap.add_argument("--looping", default="on", choices=("on", "off"), help="loop mode of the timed steps (rows with NUM_LOOPS>0)")
    ap.add_argument("--warm", type=int, default=None, help="untimed steps per row (default 3; tiny 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 8; tiny 2)")
    ap.add_argument("--rows", default="", help="comma list of row names to run (default all); 'none' = only the attention bench")
    ap.add_argument("--attn", type=int, default=1, help="1 = run the attention microbenchmark")
    ap.add_argument("--attn-shape", default=None, help="B,T,H,Hkv,D (default 48,2048,8,4,64; tiny 2,64,4,2,16)")
    ap.add_argument("--windows", default=None, help="flex window sizes (default 1024,512; tiny 32,16)")
    ap.add_argument("--attn-iters", type=int, default=10)
    ap.add_argument("--attn-warm", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting rows after this many seconds (0 = no limit); "
                    "--attn-reserve-s is kept for the attention bench")
    ap.add_argument("--attn-reserve-s", type=float, default=None, help="default 45 on CUDA, 0 on CPU")
    ap.add_argument("--shard-tokens", type=int, default=None)
    ap.add_argument("--doc-len", type=int, default=1024)
    args = ap.parse_args(argv)
    args.warm = args.warm if args.warm is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 8)
    t_start = time.perf_counter()

    out = C.Out(args.out, "bench_features")
    sets = C.parse_sets(args.set)
    env = C.build_env(args.tiny, sets, FEATURE_DEFAULTS[args.compile], TINY_FEATURE)
    env["COMPILE"] = str(args.compile)
    base_cfg = tg.Config.from_env(env)
    device = C.pick_device()
    C.setup_runtime(device, base_cfg.seed, 1 if args.tiny else None)
    compile_mode = bool(args.compile) and device.type == "cuda"
    info = C.env_info(device)
    res: dict = dict(bench="features", tiny=args.tiny, env=info, mode="compiled" if compile_mode else "eager", looping=args.looping,
                     warm=args.warm, steps=args.steps, base_env=C.knob_env(env), rows=[])
    out("bench_env", **info)
    out("bench_config", mode=res["mode"], looping=args.looping, warm=args.warm, steps=args.steps, train_batch_tokens=base_cfg.train_batch_tokens,
        grad_accum=base_cfg.grad_accum_steps, seq_len=base_cfg.train_seq_len, flex_patched=int(not compile_mode and device.type == "cuda"))

    import torch.nn.attention.flex_attention as fa
    if not hasattr(fa, "_bench_original_flex_attention"):
        fa._bench_original_flex_attention = fa.flex_attention
    if not compile_mode and device.type == "cuda":  # eager model, compiled flex (see module doc)
        fa.flex_attention = torch.compile(fa._bench_original_flex_attention, dynamic=False)

    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    rows = [] if names == ["none"] else [r for r in ROWS if not names or r[0] in names]
    unknown = set(names) - {r[0] for r in ROWS} - {"none"}
    if unknown:
        raise SystemExit(f"--rows: unknown rows {sorted(unknown)}; known: {[r[0] for r in ROWS]}")
    reserve = args.attn_reserve_s if args.attn_reserve_s is not None else (45.0 if device.type == "cuda" and args.attn else 0.0)

    tmp = C.tmpdir("bench_features_")
    files = C.write_random_shard(Path(tmp.name), base_cfg.vocab_size, args.shard_tokens or (1 << 16 if args.tiny else 1 << 22), args.doc_len)
    base_ms = None
    for name, delta in rows:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s - reserve:
            row = dict(name=name, delta=delta, status="skipped", reason="time budget")
        else:
            row = run_row(name, delta, env, device, files, args, compile_mode, args.looping == "on")
        if row.get("status") == "ok":
            if base_ms is None and name == "base":
                base_ms = row["ms_median"]
            if base_ms:
                row["delta_ms"] = row["ms_median"] - base_ms
                row["delta_pct"] = 100 * (row["ms_median"] / base_ms - 1)
        res["rows"].append(row)
        kv = {k: v for k, v in row.items() if k not in ("name", "delta", "status", "reason")}
        out("feature", row=name, env=",".join(f"{k}={v}" for k, v in delta.items()) or "base", status=row["status"], **kv,
            **({"reason": row["reason"]} if "reason" in row else {}))
        out.write_json(res)
        out.write_md(markdown(res))

    if args.attn:
        if args.attn_shape:
            B, T, H, Hkv, D = (int(x) for x in args.attn_shape.split(","))
        else:
            B, T, H, Hkv, D = (2, 64, 4, 2, 16) if args.tiny else (48, 2048, 8, 4, 64)
        windows = [int(x) for x in (args.windows or ("32,16" if args.tiny else "1024,512")).split(",")]
        res["attn"] = attn_bench(device, B, T, H, Hkv, D, windows, args.attn_iters, args.attn_warm, device.type == "cuda", out)
        out.write_json(res)
        out.write_md(markdown(res))
    tmp.cleanup()
    out("done", seconds=time.perf_counter() - t_start, json=out.dir / "bench_features.json", md=out.dir / "bench_features.md")
    return 0


def markdown(res: dict) -> str:
    e = res["env"]
    lines = [f"## bench_features ({e['device']}, torch {e['torch']}, {res['mode']} model, looping {res['looping']}"
             f"{', TINY' if res['tiny'] else ''})\n",
             f"One process; base env {', '.join(f'{k}={v}' for k, v in res['base_env'].items()) or 'defaults'}; "
             f"{res['warm']} warm + {res['steps']} timed optimizer steps per row (median).\n"]
    rows = []
    for r in res["rows"]:
        env = " ".join(f"{k}={v}" for k, v in r["delta"].items()) or "(base)"
        if r["status"] == "ok":
            rows.append([r["name"], f"`{env}`", r["ms_median"], r.get("delta_ms"), r.get("delta_pct"), r["ms_stdev"], r["peak_mem_gib"],
                         r["params"], r.get("graphs_compiled_while_timed"), "ok"])
        else:
            rows.append([r["name"], f"`{env}`", None, None, None, None, None, None, None, f"{r['status']}: {r.get('reason', '')[:80]}"])
    if rows:
        lines.append(C.md_table(["row", "env delta", "ms/step", "delta ms", "delta %", "stdev ms", "peak GiB", "params",
                                 "recompiles (timed)", "status"], rows))
    a = res.get("attn")
    if a:
        s = a["shape"]
        lines.append(f"\n### Attention microbenchmark: B={s['B']} T={s['T']} H={s['H']} Hkv={s['Hkv']} D={s['D']} {a['dtype']}, "
                     f"median of {a['iters']} (flex compiled: {a['flex_compiled']}; SDPA auto kernel: `{a['sdpa_auto_kernel']}`)\n")
        arows = []
        for name, r in a["cases"].items():
            if r["status"] == "ok":
                err = "/".join(f"{r[k]:.1e}" for k in ("err_out", "err_dq", "err_dk", "err_dv")) if "err_out" in r else "-"
                arows.append([name, r["window"] or "causal", r["pass_"], r["ms"], r["k_avg"], r["tflops"], err, "ok"])
            else:
                arows.append([name, r["window"] or "causal", None, None, None, None, None, r["reason"][:80]])
        lines.append(C.md_table(["case", "window", "pass", "ms", "avg keys/query", "TFLOPS (3x fwd formula)",
                                 "max abs err out/dq/dk/dv vs fp32", "status"], arows))
        lines.append("\nSpeedups (time ratio, >1 = the window is faster): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in a["speedups"].items() if v is not None) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
