#!/usr/bin/env python3
"""Quantization levers on ONE trained model: artifact bytes and roundtrip bpb of each variant on the same weights.

Trains train_gpt.py's config once (env + --set; give ITERATIONS and MAX_WALLCLOCK_SECONDS=0 for a fixed step count),
takes the EMA weights as train_gpt's main does, and then for every --variant (NAME:KEY=VAL,KEY=VAL; quantization
fields only: GPTQ_*, LQER_*, AWQ_LITE_*, MATRIX_/EMBED_BITS, *_CLIP_SIGMAS, COMPRESSOR, ...) collects the GPTQ Hessians
(cached per GPTQ_CALIBRATION_BATCHES), quantizes, packs, loads the artifact back from its bytes and scores it on the
val tokens (plain windows of EVAL_SEQ_LEN, no n-gram tilt: the quantizer's effect alone). The first variant is the baseline: the table gives every other's
difference in model bytes and in bpb against it. Same weights, so a difference is the quantizer's alone (no seed noise
from training; the GPTQ calibration batches are the same training tokens for every variant with the same count).

  python3 bench/bench_quant.py --out DIR --set ITERATIONS=300 --set MAX_WALLCLOCK_SECONDS=0 \\
      --variant base: --variant awq:AWQ_LITE_ENABLED=1 --variant calib32:GPTQ_CALIBRATION_BATCHES=32
  python3 bench/bench_quant.py --tiny --out /tmp/q --variant base: --variant rtn:QUANT=rtn      # CPU test

--save-artifact writes the first variant's final_model.ptz into --out (an input for bench_ttt.py).
Output: key:value lines and <out>/bench_quant.{log,json,md}.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Out, build_env, device_name, knob_env, md_table, parse_sets, pick_device, tg  # noqa: E402

# Training-side fields a variant must not change: the weights are trained once.
TRAIN_ONLY = ("NUM_", "MODEL_DIM", "VOCAB_SIZE", "TRAIN_", "ITERATIONS", "SEED", "MATRIX_LR", "EMBED_LR", "QK_", "QAT")


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {spec!r}: expected NAME:KEY=VAL,KEY=VAL (NAME: alone = the config as trained)")
    sets = parse_sets([kv for kv in re.split(r",(?=[A-Z_][A-Z0-9_]*=)", rest) if kv.strip()])  # K=a,b stays whole
    bad = [k for k in sets if k.startswith(TRAIN_ONLY)]
    if bad:
        raise SystemExit(f"--variant {name}: {bad[0]} changes training, not quantization (train once, quantize many ways)")
    return name, sets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", action="append", help="train_gpt env override for the training run")
    ap.add_argument("--variant", action="append", required=True, help="NAME:KEY=VAL,... quantization variant (first = baseline)")
    ap.add_argument("--tiny", action="store_true", help="PRESET=smoke: train_gpt's tiny CPU config and its own data under --out")
    ap.add_argument("--save-artifact", action="store_true", help="write the first variant's final_model.ptz into --out")
    ap.add_argument("--threads", type=int, default=4, help="compressions running at once (beside the GPTQ of the next variant)")
    a = ap.parse_args(argv)
    variants = [parse_variant(v) for v in a.variant]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("--variant: names must be unique")
    defaults = dict(TTT_ENABLED="0", SLIDING_EVAL="0")
    if a.tiny:
        defaults.update(PRESET="smoke", ITERATIONS="8", MAX_WALLCLOCK_SECONDS="0", VAL_MAX_TOKENS="4096", GPTQ_CALIBRATION_BATCHES="2",
                        DATA_PATH=str(a.out / "smoke_data"), TOKENIZER_PATH=str(a.out / "smoke_data" / "smoke.model"))
    env = build_env(False, parse_sets(a.set), defaults)
    cfg = tg.Config.from_env(env)
    device = pick_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(cfg.seed)
    out = Out(a.out, "bench_quant")
    if cfg.preset == "smoke":
        tg.build_smoke_dataset(cfg.data_path, cfg.tokenizer_path, cfg.vocab_size, lambda m: None)
    kernels = tg.resolve_kernels(cfg, device)
    sp, luts, val = tg.load_eval_data(cfg, device)
    bos = tg.bos_of(sp)
    train_files = tg.shard_files(cfg.data_path, "train")

    # ---- train once (the main's recipe up to the EMA weights) ----
    model = tg.GPT(cfg, bos, kernels).to(device)
    trainer = tg.Trainer(cfg, model, device, 0, 1, train_files, out.log)
    trainer.warmup()
    stats = trainer.train(None)
    tg.set_qat(model, False)
    if trainer.ema is not None:
        trainer.ema.copy_to(model)
    tg.bake_shared_heads(model)
    L = min(cfg.eval_seq_len, len(val) - 1)
    pl, pb, nt, _ = tg.evaluate(model, model, val, L, L, cfg.eval_batch_seqs, luts, device, 0, 1)
    out("prequant", steps=stats.get("steps"), train_s=stats.get("train_seconds"), val_loss=pl, val_bpb=pb, tokens=nt)
    local_tokens, seq_len = trainer.local_tokens, trainer.seq_len
    trainer.loader.close()
    del trainer

    # ---- quantize the same weights every way ----
    hess_cache: dict[int, tuple[dict, float]] = {}
    rows, res = [], dict(device=device_name(device), torch=torch.__version__,
                         train_env=knob_env(env), prequant=dict(val_loss=pl, val_bpb=pb, tokens=nt, **stats), variants={})
    vcfgs, hess = {}, {}
    for name, sets in variants:  # Hessians first, one pass per calibration count, shared by the variants that use it
        vcfgs[name] = vcfg = tg.Config.from_env(dict(env, **sets))
        n = vcfg.gptq_calibration_batches if vcfg.quant == "gptq" else 0
        if n and n not in hess_cache:
            t0 = time.perf_counter()
            calib = tg.DistributedLoader(train_files, 0, 1, local_tokens, seq_len, device, prefetch=0, reverse=True, vocab_size=cfg.vocab_size)
            H = tg.collect_hessians(model, calib, n, device, 1)
            calib.close()
            if device.type == "cuda":
                torch.cuda.synchronize()
            hess_cache[n] = (H, time.perf_counter() - t0)
        hess[name] = hess_cache[n] if n else ({}, 0.0)

    def pack(name, tensors, qmeta):  # the compressor (C code, releases the GIL) runs beside the next variant's GPTQ
        t0 = time.perf_counter()
        return tg.build_artifact(tensors, qmeta, vcfgs[name], bos), time.perf_counter() - t0

    # GPTQ stays on the main thread: it is a Python loop of small kernels, and several such loops in threads (or
    # processes sharing the GPU) convoy on the GIL / the GPU's context switches (measured: far slower than in turn).
    t_all, pending = time.perf_counter(), {}
    with ThreadPoolExecutor(max_workers=a.threads) as pool:
        for name in vcfgs:
            t0 = time.perf_counter()
            tensors, qmeta = tg.quantize_model(model, vcfgs[name], hess[name][0])
            if device.type == "cuda":
                torch.cuda.synchronize()
            pending[name] = (pool.submit(pack, name, tensors, qmeta), qmeta, time.perf_counter() - t0)
        packed = {name: (*f.result(), qmeta, quant_s) for name, (f, qmeta, quant_s) in pending.items()}
    out("packed", variants=len(packed), threads=a.threads, seconds=time.perf_counter() - t_all)
    for i, (name, sets) in enumerate(variants):
        blob, pack_s, qmeta, quant_s = packed[name]
        hess_s = hess[name][1]
        qmodel, _ = tg.load_artifact(blob, device)
        ql, qb, qt, _ = tg.evaluate(qmodel, qmodel, val, L, L, cfg.eval_batch_seqs, luts, device, 0, 1)
        if qt != nt:
            raise SystemExit(f"variant {name}: scored {qt} targets, the prequant eval {nt}")
        r = dict(sets=sets, bytes_model=len(blob), val_loss=ql, val_bpb=qb, quant_gap_bpb=qb - pb, hessian_s=hess_s, quant_s=quant_s, pack_s=pack_s)
        if vcfgs[name].awq_lite_enabled:
            r["awq"] = tg.awq_summary(qmeta)
        res["variants"][name] = r
        if i == 0 and a.save_artifact:
            tg.atomic_write_bytes(a.out / "final_model.ptz", blob)
        base = res["variants"][variants[0][0]]
        out("variant", name=name, bytes_model=len(blob), d_bytes=len(blob) - base["bytes_model"], val_bpb=qb,
            d_bpb=qb - base["val_bpb"], quant_gap_bpb=qb - pb, hessian_s=hess_s, quant_s=quant_s, pack_s=pack_s)
        rows.append([name, ",".join(f"{k}={v}" for k, v in sets.items()) or "(as trained)", f"{len(blob):,}",
                     f"{len(blob) - base['bytes_model']:+,}", f"{qb:.5f}", f"{qb - base['val_bpb']:+.5f}", f"{qb - pb:+.5f}",
                     f"{hess_s:.1f}", f"{quant_s:.1f}", f"{pack_s:.1f}"])
        del qmodel
    out.write_json(res)
    out.write_md(f"prequant val_bpb {pb:.5f} ({nt:,} targets, {stats.get('steps')} steps)\n\n" + md_table(
        ["variant", "settings", "model bytes", "vs first", "roundtrip bpb", "vs first", "quant gap", "hessian s", "quantize s", "pack s"], rows))
    print((a.out / "bench_quant.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
