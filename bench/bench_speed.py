#!/usr/bin/env python3
"""Training speed of train_gpt.py's default config vs. a plain PyTorch reference GPT of equal shape.

On the device it finds (CUDA, else CPU for --tiny testing), in ONE process:
  1. bf16 matmul ceiling: best-of-5 average time of 8192x8192x8192 torch.matmul -> TFLOPS.
  2. ours: Config.from_env -> GPT -> Trainer; Trainer.warmup() (compiles both loop modes), then for
     looping off and on: `--settle` untimed steps, `--steps` timed optimizer steps (each bracketed by a
     synchronize; one step = the Trainer's full grad accumulation + optimizers + EMA). Median + mean
     ms/step, tokens/s, peak memory, analytic FLOPs/token and MFU (vs the measured ceiling).
     Time-weighted: the default run spends ENABLE_LOOPING_AT (0.35) of its wall time unlooped, so
     tok_s_weighted = 0.35*tok_s_off + 0.65*tok_s_on, ms_step_weighted = tokens_per_step / tok_s_weighted.
  3. --profile: torch.profiler over 3 steps of ours (looping on unless NUM_LOOPS=0); top-25 kernels.
  4. reference: 11x512 GPT, 8 heads / 4 KV heads, head dim 64, MLP 4x relu^2, RMSNorm, RoPE, tied
     8192 vocab, SDPA(is_causal, enable_gqa), bf16 autocast, fused AdamW, no torch.compile, the same
     tokens per step through the same grad accumulation. The shape follows the config (--tiny too).
  5. ratio ours/reference tokens/s; target check: tok/s per GPU >= 786432/0.1217/8 and MFU >= 40%.

Data: a temporary random-token shard written with train_gpt.write_shard (no dataset needed).
Output: key:value lines on stdout and <out>/bench_speed.{log,json,md} (the profile table goes into both).

  python3 bench/bench_speed.py --out /tmp/speed --set WARMUP_STEPS=2 --profile     # H100
  python3 bench/bench_speed.py --tiny --out /tmp/b1                                # CPU test
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

tg = C.tg
warnings.filterwarnings("ignore", message=".*Profiler clears events")


# ---------------------------------------------------------------------------------------------
# Plain reference GPT
# ---------------------------------------------------------------------------------------------
def apply_rope(x, cos, sin):  # x [B, H, T, D]; rotate halves
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RefAttention(nn.Module):
    def __init__(self, d, H, Hkv, D):
        super().__init__()
        self.H, self.Hkv, self.D = H, Hkv, D
        self.q = nn.Linear(d, H * D, bias=False)
        self.k = nn.Linear(d, Hkv * D, bias=False)
        self.v = nn.Linear(d, Hkv * D, bias=False)
        self.o = nn.Linear(H * D, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.H, self.D).transpose(1, 2)
        k = self.k(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        v = self.v(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        q, k = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.Hkv != self.H)
        return self.o(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class RefBlock(nn.Module):
    def __init__(self, d, H, Hkv, D, hidden):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = RefAttention(d, H, Hkv, D)
        self.fc = nn.Linear(d, hidden, bias=False)
        self.proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.n1(x), cos, sin)
        return x + self.proj(F.relu(self.fc(self.n2(x))).square())


class RefGPT(nn.Module):
    def __init__(self, V, L, d, H, Hkv, D, hidden, T, base=10000.0):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.blocks = nn.ModuleList(RefBlock(d, H, Hkv, D, hidden) for _ in range(L))
        self.norm = nn.RMSNorm(d)
        inv = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
        f = torch.outer(torch.arange(T, dtype=torch.float32), inv)
        self.register_buffer("cos", f.cos(), persistent=False)
        self.register_buffer("sin", f.sin(), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids, targets):
        T = ids.size(1)
        x = self.emb(ids)
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = F.linear(self.norm(x), self.emb.weight)  # tied head
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def ref_shape(cfg) -> dict:
    return dict(V=cfg.vocab_size, L=cfg.num_layers, d=cfg.model_dim, H=cfg.n_heads, Hkv=cfg.num_kv_heads, D=cfg.d_head,
                hidden=int(cfg.mlp_mult * cfg.model_dim), T=cfg.train_seq_len)


# ---------------------------------------------------------------------------------------------
# Profiler table
# ---------------------------------------------------------------------------------------------
def profile_ours(trainer, device, n_steps: int, top: int) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trainer.step(0, 1.0)
    C.sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(n_steps):
            trainer.step(i, 1.0)
        C.sync(device)
        wall_ms = 1000 * (time.perf_counter() - t0)
    evs = prof.key_averages()
    # user annotations (e.g. "Optimizer.step#Muon.step") are ranges over kernels, not kernels: drop them
    evs = [e for e in evs if not getattr(e, "is_user_annotation", False) and not e.key.startswith(("ProfilerStep", "Optimizer.", "## "))]
    if device.type == "cuda":
        ks = [e for e in evs if e.device_type == DeviceType.CUDA]
        if not ks:  # older/newer profilers: kernels are the events with device self time and no CPU time
            ks = [e for e in evs if getattr(e, "self_device_time_total", 0) > 0 and e.self_cpu_time_total == 0]
        tot = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        kind = "cuda_kernels"
    else:
        ks = list(evs)
        tot = lambda e: e.self_cpu_time_total
        kind = "cpu_ops_self_time"
    ks.sort(key=tot, reverse=True)
    step_ms = wall_ms / n_steps
    all_ms = sum(tot(e) for e in ks) / 1000 / n_steps
    rows = []
    for e in ks[:top]:
        ms = tot(e) / 1000 / n_steps
        rows.append(dict(name=e.key, calls=e.count // n_steps if e.count % n_steps == 0 else e.count / n_steps, ms_per_step=ms,
                         pct_step=100 * ms / step_ms))
    return dict(kind=kind, steps=n_steps, step_ms=step_ms, busy_ms_per_step=all_ms, busy_pct=100 * all_ms / step_ms,
                n_distinct=len(ks), top=rows)


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VAL", help="train_gpt env override (wins over the process env)")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU-sized config (vocab 512, 2 layers, dim 64, seq 64)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per loop mode (default 8; tiny 2)")
    ap.add_argument("--settle", type=int, default=None, help="untimed steps after each mode switch (default 2; tiny 1)")
    ap.add_argument("--modes", default="off,on", help="loop modes to time: off,on (on is skipped when NUM_LOOPS=0)")
    ap.add_argument("--ref", type=int, default=1, help="1 = also time the plain reference model")
    ap.add_argument("--ref-steps", type=int, default=None, help="timed steps of the reference (default = --steps)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over --profile-steps steps of ours; top-25 kernels")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--profile-mode", default="auto", choices=("auto", "on", "off"), help="loop mode profiled (auto = on if NUM_LOOPS>0)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--matmul-n", type=int, default=None, help="matmul ceiling size (default 8192; tiny 256)")
    ap.add_argument("--shard-tokens", type=int, default=None, help="tokens in the random shard (default 2^23; tiny 2^16)")
    ap.add_argument("--doc-len", type=int, default=1024, help="mean document length (BOS spacing) of the random shard")
    args = ap.parse_args(argv)

    steps = args.steps if args.steps is not None else (2 if args.tiny else 8)
    settle = args.settle if args.settle is not None else (1 if args.tiny else 2)
    ref_steps = args.ref_steps if args.ref_steps is not None else steps
    default_matmul_n = 256 if args.tiny else 8192
    matmul_n = args.matmul_n or default_matmul_n
    shard_tokens = args.shard_tokens or (1 << 16 if args.tiny else 1 << 23)

    out = C.Out(args.out, "bench_speed")
    env = C.build_env(args.tiny, C.parse_sets(args.set))
    cfg = tg.Config.from_env(env)
    device = C.pick_device()
    C.setup_runtime(device, cfg.seed, 1 if args.tiny else None)
    info = C.env_info(device)
    kernels = tg.resolve_kernels(cfg, device)  # what the timed config runs on
    info["attention"], info["mlp_kernel"] = kernels.attention, kernels.mlp
    # the full-causal kernel above; DOC_ATTENTION's document masks may run on another (flex without a varlen kernel)
    info["doc_attention"] = ("varlen" if kernels.varlen else "flex" if kernels.flex else "dense masks") if cfg.doc_attention else "off"
    info["ce_kernel"] = "triton" if kernels.ce is not None else "torch"
    res: dict = dict(bench="speed", tiny=args.tiny, env=info, overrides=C.knob_env(C.parse_sets(args.set)),
                     knob_env=C.knob_env(env), config=cfg.to_dict(), flops_formula=C.FLOPS_DOC, steps=steps, settle=settle)
    def save():  # JSON + markdown after every stage: a timeout still leaves what was measured
        out.write_json(res)
        out.write_md(markdown(res))

    out("bench_env", **info)
    out("bench_config", tiny=int(args.tiny), steps=steps, settle=settle, compile=int(cfg.compile and device.type == "cuda"),
        train_batch_tokens=cfg.train_batch_tokens, seq_len=cfg.train_seq_len, num_loops=cfg.num_loops,
        enable_looping_at=cfg.enable_looping_at, overrides=",".join(f"{k}={v}" for k, v in res["overrides"].items()) or "none")

    # 1. matmul ceiling (before the models take memory)
    mm = C.measure_matmul_ceiling(device, matmul_n)
    res["matmul"] = mm
    ceiling = mm["tflops"] * 1e12
    out("matmul", n=mm["n"], dtype=mm["dtype"], ms=mm["ms"], tflops=mm["tflops"])
    save()

    tmp = C.tmpdir("bench_speed_")
    files = C.write_random_shard(Path(tmp.name), cfg.vocab_size, shard_tokens, args.doc_len)

    # 2. ours
    model = tg.GPT(cfg, 1, kernels).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    trainer = tg.Trainer(cfg, model, device, 0, 1, files, out)
    tokens_per_step = trainer.local_tokens * trainer.accum
    res["ours"] = dict(params=n_params, accum=trainer.accum, local_tokens=trainer.local_tokens, tokens_per_step=tokens_per_step)
    out("ours_model", params=n_params, accum=trainer.accum, micro_batch_tokens=trainer.local_tokens, tokens_per_step=tokens_per_step,
        layers_virtual_on=len(tg.layer_order(cfg, True)))
    t0 = time.perf_counter()
    trainer.warmup()
    C.sync(device)
    res["ours"]["warmup_s"] = time.perf_counter() - t0
    out("ours_warmup", seconds=res["ours"]["warmup_s"], warmup_steps=cfg.warmup_steps, modes=2 if cfg.num_loops > 0 else 1)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if cfg.num_loops == 0:
        modes = [m for m in modes if m != "on"] or ["off"]
    for mode in modes:
        model.looping_active = mode == "on"
        C.free_memory(device)
        C.reset_peak(device)
        losses = []
        times = C.time_steps(lambda i: losses.append(trainer.step(i, 1.0)), steps, device, settle)
        st = C.stats_ms(times)
        fl = C.ours_flops_per_token(model, cfg, mode == "on")
        tok_s = tokens_per_step / (st["median"] / 1000)
        r = dict(ms_step=st, tok_s=tok_s, tok_s_mean=tokens_per_step / (st["mean"] / 1000), peak_mem_gib=C.peak_gib(device),
                 flops=fl, mfu=tok_s * fl["flops_per_token"] / ceiling, last_loss=float(losses[-1]),
                 achieved_tflops=tok_s * fl["flops_per_token"] / 1e12)
        res["ours"][mode] = r
        out("ours_speed", mode=mode, ms_step_median=st["median"], ms_step_mean=st["mean"], ms_step_min=st["min"], ms_step_stdev=st["stdev"],
            tok_s=tok_s, tok_s_mean=r["tok_s_mean"], flops_per_token=fl["flops_per_token"], attn_flops_per_token=fl["attn_flops"],
            layer_visits=fl["layer_visits"], tflops=r["achieved_tflops"], mfu=r["mfu"], peak_mem_gib=r["peak_mem_gib"], loss=r["last_loss"])
        save()
    # Time-weighted only when it means something: both loop modes timed, or no looping at all.
    f = cfg.enable_looping_at if cfg.num_loops > 0 else 1.0
    w_tok = None
    if "off" in res["ours"] and ("on" in res["ours"] or cfg.num_loops == 0):
        off = res["ours"]["off"]
        on = res["ours"].get("on", off)
        w_tok = f * off["tok_s"] + (1 - f) * on["tok_s"]
        w_flops = f * off["tok_s"] * off["flops"]["flops_per_token"] + (1 - f) * on["tok_s"] * on["flops"]["flops_per_token"]
        res["ours"]["weighted"] = dict(frac_off=f, tok_s=w_tok, ms_step=tokens_per_step / w_tok * 1000, mfu=w_flops / ceiling,
                                       est_8gpu_ms_step=tokens_per_step / (8 * w_tok) * 1000 if cfg.train_batch_tokens == tokens_per_step else None)
        wres = res["ours"]["weighted"]
        out("ours_weighted", frac_off=f, tok_s=w_tok, ms_step=wres["ms_step"], mfu=wres["mfu"],
            est_8gpu_ms_step=wres["est_8gpu_ms_step"])
    # targets; MFU is judged only against a ceiling measured at a size that reaches the GPU's peak
    ceiling_ok = matmul_n >= (default_matmul_n if args.tiny else C.MIN_CEILING_N)
    tgt = dict(target_tok_s_per_gpu=C.TARGET_TOK_S_PER_GPU, target_mfu=C.TARGET_MFU, ceiling_ok=ceiling_ok)
    for k in modes + (["weighted"] if w_tok is not None else []):
        r = res["ours"][k]
        tgt[f"tok_s_ok_{k}"] = r["tok_s"] >= C.TARGET_TOK_S_PER_GPU
        tgt[f"mfu_ok_{k}"] = (r["mfu"] >= C.TARGET_MFU) if ceiling_ok else None
    if w_tok is not None:
        tgt["tok_s_frac_of_target_weighted"] = w_tok / C.TARGET_TOK_S_PER_GPU
    res["target"] = tgt
    out("target", **{k: ("na" if v is None else v) for k, v in tgt.items()})
    res["modes"] = modes
    save()

    # 3. profile
    if args.profile:
        pmode = args.profile_mode if args.profile_mode != "auto" else ("on" if cfg.num_loops > 0 else "off")
        model.looping_active = pmode == "on"
        prof = profile_ours(trainer, device, args.profile_steps, args.top)
        prof["mode"] = pmode
        res["profile"] = prof
        out("profile", mode=pmode, kind=prof["kind"], steps=prof["steps"], step_ms=prof["step_ms"], busy_ms_per_step=prof["busy_ms_per_step"],
            busy_pct=prof["busy_pct"], distinct=prof["n_distinct"])
        for i, row in enumerate(prof["top"], 1):
            out("kernel", rank=i, ms_per_step=row["ms_per_step"], pct_step=row["pct_step"], calls_per_step=row["calls"], name=row["name"][:160])
        save()
    trainer.loader.close()
    del trainer, model
    C.free_memory(device)
    if device.type == "cuda":
        torch._dynamo.reset()

    # 4. reference
    if args.ref:
        sh = ref_shape(cfg)
        torch.manual_seed(cfg.seed)
        ref = RefGPT(**sh).to(device)
        opt = torch.optim.AdamW(ref.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0, **(dict(fused=True) if device.type == "cuda" else {}))
        accum, local = res["ours"]["accum"], res["ours"]["local_tokens"]
        loader = tg.DistributedLoader(files, 0, 1, local, cfg.train_seq_len, device, 2)
        losses = []

        def ref_step(i):
            total = 0.0
            for _ in range(accum):
                x, y, _ = loader.next()
                with tg.autocast_ctx(device):
                    loss = ref(x, y)
                (loss / accum).backward()
                total = total + loss.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / accum)

        C.reset_peak(device)
        times = C.time_steps(ref_step, ref_steps, device, settle + 1)
        loader.close()
        st = C.stats_ms(times)
        fl = C.ref_flops_per_token(sh["L"], sh["d"], sh["H"], sh["Hkv"], sh["D"], sh["hidden"], sh["V"], sh["T"])
        tok_s = tokens_per_step / (st["median"] / 1000)
        res["ref"] = dict(shape=sh, params=sum(p.numel() for p in ref.parameters()), ms_step=st, tok_s=tok_s,
                          tok_s_mean=tokens_per_step / (st["mean"] / 1000), peak_mem_gib=C.peak_gib(device), flops=fl,
                          mfu=tok_s * fl["flops_per_token"] / ceiling, last_loss=float(losses[-1]))
        rr = res["ref"]
        out("ref_speed", params=rr["params"], ms_step_median=st["median"], ms_step_mean=st["mean"], ms_step_min=st["min"], tok_s=tok_s,
            tok_s_mean=rr["tok_s_mean"], flops_per_token=fl["flops_per_token"], mfu=rr["mfu"], peak_mem_gib=rr["peak_mem_gib"], loss=rr["last_loss"])
        ratios = {m: res["ours"][m]["tok_s"] / tok_s for m in modes}
        if w_tok is not None:
            ratios["weighted"] = w_tok / tok_s
        res["ratio_ours_over_ref_tok_s"] = ratios
        out("ratio", **{f"ours_over_ref_tok_s_{k}": v for k, v in ratios.items()})
        save()
        del ref, opt
        C.free_memory(device)

    save()
    tmp.cleanup()
    out("done", json=out.dir / "bench_speed.json", md=out.dir / "bench_speed.md")
    return 0


def markdown(res: dict) -> str:
    """Markdown snippet of whatever `res` holds so far."""
    e, mm, o = res["env"], res.get("matmul"), res.get("ours", {})
    lines = [f"## bench_speed ({e['device']}, torch {e['torch']}, cuda {e['cuda']}, flash_attn {e['flash_attn']}, attention {e.get('attention', '?')}"
             f", doc attention {e.get('doc_attention', '?')}, CE {e.get('ce_kernel', '?')}{', TINY' if res['tiny'] else ''})\n"]
    if "warmup_s" in o:
        lines.append(f"Config: defaults{' + ' + ' '.join(f'{k}={v}' for k, v in res['overrides'].items()) if res['overrides'] else ''}; "
                     f"{o['tokens_per_step']:,} tokens/step = {o['accum']} x {o['local_tokens']:,}-token micro-batches; "
                     f"{res['steps']} timed steps per mode after {res['settle']} settle steps; warmup/compile {o['warmup_s']:.1f} s.\n")
    if mm:
        lines.append(f"Measured matmul ceiling: {mm['n']}^3 {mm['dtype']} = {mm['tflops']:.1f} TFLOPS ({mm['ms']:.2f} ms).\n")
    rows = []
    for m in ("off", "on"):
        if m in o:
            r = o[m]
            rows.append([f"ours, looping {m}", r["ms_step"]["median"], r["ms_step"]["mean"], r["tok_s"], r["flops"]["flops_per_token"] / 1e6,
                         100 * r["mfu"], r["peak_mem_gib"]])
    w = o.get("weighted")
    if w:
        rows.append([f"ours, time-weighted ({w['frac_off']:.2f} of time off)", w["ms_step"], None, w["tok_s"], None, 100 * w["mfu"], None])
    if "ref" in res:
        r = res["ref"]
        rows.append(["reference (plain PyTorch, eager)", r["ms_step"]["median"], r["ms_step"]["mean"], r["tok_s"],
                     r["flops"]["flops_per_token"] / 1e6, 100 * r["mfu"], r["peak_mem_gib"]])
    if rows:
        lines.append(C.md_table(["model", "ms/step median", "ms/step mean", "tok/s per GPU", "MFLOPs/token", "MFU %", "peak GiB"], rows))
    if "ratio_ours_over_ref_tok_s" in res:
        lines.append("Ours / reference tokens/s: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["ratio_ours_over_ref_tok_s"].items()) + "\n")
    t = res.get("target")
    if t:
        verdict = lambda ok: "not judged" if ok is None else ("PASS" if ok else "FAIL")
        if "tok_s_ok_weighted" in t:
            line = (f"Target: tok/s per GPU >= {t['target_tok_s_per_gpu']:,.0f} (786432/0.1217/8): time-weighted "
                    f"{verdict(t['tok_s_ok_weighted'])} ({100 * t['tok_s_frac_of_target_weighted']:.1f}% of target); "
                    f"MFU >= 40%: time-weighted {verdict(t['mfu_ok_weighted'])}.")
        else:
            line = ("Target: not judged (the time-weighted rate needs both loop modes timed); per mode: "
                    + ", ".join(f"{m} tok/s {verdict(t[f'tok_s_ok_{m}'])}, MFU {verdict(t[f'mfu_ok_{m}'])}" for m in res.get("modes", [])) + ".")
        if not t.get("ceiling_ok", True):
            line += f" MFU not judged: the matmul ceiling came from n={mm['n']}, too small to reach the GPU's peak."
        lines.append(line + "\n")
    if w and w.get("est_8gpu_ms_step"):
        lines.append(f"Estimated 8-GPU ms/step (per-GPU rate, no communication): {w['est_8gpu_ms_step']:.1f} ms (target 121.7).\n")
    prof = res.get("profile")
    if prof:
        lines.append(f"### Profile: top-{len(prof['top'])} {prof['kind']} of ours (looping {prof['mode']}, {prof['steps']} steps, "
                     f"{prof['step_ms']:.1f} ms/step under the profiler, device busy {prof['busy_pct']:.1f}%)\n")
        lines.append(C.md_table(["#", "kernel", "calls/step", "ms/step", "% of step"],
                                [[i, f"`{r['name'][:110]}`", r["calls"], r["ms_per_step"], r["pct_step"]] for i, r in enumerate(prof["top"], 1)]))
    lines.append("FLOPs formula:\n\n```\n" + res["flops_formula"] + "\n```\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
