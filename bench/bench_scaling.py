#!/usr/bin/env python3
"""Multi-GPU scaling of train_gpt.py's default config: tokens/s on N GPUs vs N x one GPU, and the
training loss on 1 vs N GPUs for the same global batch.

Driver (default): launches this file once per entry of --nprocs through torchrun
(`python -m torch.distributed.run --standalone --nproc_per_node=N bench_scaling.py --worker ...`), one
after the other, then compares. Each worker, on every rank:
  1. Config.from_env (defaults < --tiny < env < --set), GPT(SEED), Trainer (DDP when N > 1; the global
     batch TRAIN_BATCH_TOKENS is the same for every N: grad accumulation = 8 // N), and an identical
     random-token shard (same seed) so the global batches are the same token sequences.
  2. Loss equality: --loss-steps optimizer steps from the init, looping off, lr multiplier 1.0; the
     global mean loss of each step (all-reduced) is recorded. The first of these steps compiles.
  3. Speed, per loop mode (off, on): --settle untimed steps, then --steps timed trainer.step() calls
     (each followed by a device synchronize). tok/s = TRAIN_BATCH_TOKENS / median step time.
Results: scaling efficiency = tok/s(N GPUs) / (N x tok/s(1 GPU)) per mode and time-weighted
(ENABLE_LOOPING_AT of the time off), max |loss_N - loss_1| over the loss steps.
Output: key:value lines and <out>/bench_scaling.{log,json,md} (+ one bench_scaling_w<N>.json per run).

  python3 bench/bench_scaling.py --out /tmp/scale --nprocs 1,2                  # 2 GPUs
  python3 bench/bench_scaling.py --out /tmp/scale --nprocs 1,2 --tiny           # CPU (gloo) check
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

tg = C.tg


def worker(args) -> int:
    rank, world, device = tg.setup_distributed()
    env = C.build_env(args.tiny, C.parse_sets(args.set))
    if "GRAD_ACCUM_STEPS" not in C.parse_sets(args.set) and "GRAD_ACCUM_STEPS" not in os.environ:
        env["GRAD_ACCUM_STEPS"] = "0"  # auto = 8 // N: same micro-batches, same global batch for every N (--tiny fixes 2)
    cfg = tg.Config.from_env(env)
    C.setup_runtime(device, cfg.seed, 1 if args.tiny else None)
    log = C.Out(args.out, f"bench_scaling_w{world}") if rank == 0 else tg.Logger(None, rank)
    tmp = C.tmpdir(f"bench_scaling_r{rank}_")
    files = C.write_random_shard(Path(tmp.name), cfg.vocab_size, args.shard_tokens or (1 << 16 if args.tiny else 1 << 23), 1024)
    model = tg.GPT(cfg, 1).to(device)
    trainer = tg.Trainer(cfg, model, device, rank, world, files, log)
    res: dict = dict(world=world, accum=trainer.accum, micro_batch_tokens=trainer.local_tokens, tokens_per_step=cfg.train_batch_tokens,
                     env=C.env_info(device), overrides=C.knob_env(C.parse_sets(args.set)), losses=[], modes={})

    def save():
        if rank == 0:
            log.write_json(res)

    def global_mean(t: torch.Tensor) -> float:
        t = t.detach().float().clone()
        if world > 1:
            dist.all_reduce(t)
            t /= world
        return float(t)

    t0 = time.perf_counter()
    for i in range(args.loss_steps):
        res["losses"].append(global_mean(trainer.step(i, 1.0)))
        log("loss_step", world=world, step=i + 1, loss=res["losses"][-1], elapsed_s=time.perf_counter() - t0)
    res["loss_phase_s"] = time.perf_counter() - t0
    save()
    modes = [m for m in args.modes.split(",") if m and not (m == "on" and cfg.num_loops == 0)]
    for mode in modes:
        model.looping_active = mode == "on"
        C.free_memory(device)
        C.reset_peak(device)
        t0 = time.perf_counter()
        times = C.time_steps(lambda i: trainer.step(args.loss_steps + i, 1.0), args.steps, device, args.settle)
        if world > 1:  # every rank's times are within one all-reduce of each other; report the slowest median
            med = torch.tensor(C.stats_ms(times)["median"], device=device)
            dist.all_reduce(med, op=dist.ReduceOp.MAX)
            ms = float(med)
        else:
            ms = C.stats_ms(times)["median"]
        tok_s = cfg.train_batch_tokens / (ms / 1000)
        r = dict(ms_step=ms, ms_steps_rank0=times, tok_s=tok_s, tok_s_per_gpu=tok_s / world, peak_mem_gib=C.peak_gib(device),
                 wall_s=time.perf_counter() - t0)
        res["modes"][mode] = r
        log("scaling_run", world=world, mode=mode, ms_step=ms, tok_s=tok_s, tok_s_per_gpu=r["tok_s_per_gpu"],
            peak_mem_gib=r["peak_mem_gib"], wall_s=r["wall_s"])
        save()
    res["enable_looping_at"] = cfg.enable_looping_at if cfg.num_loops > 0 else 1.0
    save()
    trainer.loader.close()
    tmp.cleanup()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def weighted(r: dict, f: float) -> float | None:
    m = r["modes"]
    if "off" in m and "on" in m:
        return f * m["off"]["tok_s"] + (1 - f) * m["on"]["tok_s"]
    return next(iter(m.values()))["tok_s"] if m else None


def driver(args) -> int:
    nprocs = [int(n) for n in args.nprocs.split(",")]
    if nprocs[0] != 1:
        raise SystemExit("--nprocs must start with 1 (the baseline)")
    if torch.cuda.is_available() and max(nprocs) > torch.cuda.device_count():
        raise SystemExit(f"--nprocs {args.nprocs}: only {torch.cuda.device_count()} GPU(s) visible")
    out = C.Out(args.out, "bench_scaling")
    passthrough = ["--out", args.out, "--steps", str(args.steps), "--settle", str(args.settle), "--loss-steps", str(args.loss_steps),
                   "--modes", args.modes] + (["--tiny"] if args.tiny else []) + sum((["--set", s] for s in args.set), [])
    if args.shard_tokens:
        passthrough += ["--shard-tokens", str(args.shard_tokens)]
    runs: dict[int, dict] = {}
    res: dict = dict(bench="scaling", tiny=args.tiny, nprocs=nprocs, runs=runs, scaling={})
    for n in nprocs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__, "--worker"] + passthrough
        out("launch", nproc=n, cmd=" ".join(cmd[2:]).replace(" ", "_"))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}, timeout=args.timeout)
        path = Path(args.out) / f"bench_scaling_w{n}.json"
        if p.returncode != 0 or not path.exists():
            out("run_failed", nproc=n, rc=p.returncode)
            out.write_json(res)
            return 1
        runs[n] = json.loads(path.read_text())
        out("run_done", nproc=n, wall_s=time.perf_counter() - t0)
    base = runs[1]
    f = base.get("enable_looping_at", 1.0)
    for n in nprocs[1:]:
        r = runs[n]
        sc = {}
        for mode in base["modes"]:
            if mode in r["modes"]:
                sc[mode] = r["modes"][mode]["tok_s"] / (n * base["modes"][mode]["tok_s"])
        wb, wn = weighted(base, f), weighted(r, f)
        if wb and wn:
            sc["weighted"] = wn / (n * wb)
        diffs = [abs(a - b) for a, b in zip(base["losses"], r["losses"])]
        sc["loss_max_abs_diff"] = max(diffs) if diffs else None
        sc["loss_max_rel_diff"] = max(d / abs(a) for d, a in zip(diffs, base["losses"])) if diffs else None
        res["scaling"][n] = sc
        out("scaling", nproc=n, **{f"efficiency_{k}": v for k, v in sc.items() if not k.startswith("loss")},
            tok_s_per_gpu_1=wb, tok_s_per_gpu_n=wn / n if wn else None)
        out("loss_equality", nproc=n, steps=len(diffs), max_abs_diff=sc["loss_max_abs_diff"], max_rel_diff=sc["loss_max_rel_diff"],
            losses_1=",".join(f"{x:.5f}" for x in base["losses"]), losses_n=",".join(f"{x:.5f}" for x in r["losses"]))
    out.write_json(res)
    out.write_md(markdown(res))
    out("done", json=out.dir / "bench_scaling.json", md=out.dir / "bench_scaling.md")
    return 0


def markdown(res: dict) -> str:
    runs = res["runs"]
    e = runs[1]["env"]
    lines = [f"## bench_scaling ({e['device']}, torch {e['torch']}{', TINY' if res['tiny'] else ''})\n",
             f"Global batch {runs[1]['tokens_per_step']:,} tokens/step for every GPU count (grad accumulation 8 // N).\n"]
    rows = []
    for n, r in runs.items():
        for mode, m in r["modes"].items():
            eff = res["scaling"].get(n, {}).get(mode) if n != 1 else 1.0
            rows.append([n, mode, r["accum"], m["ms_step"], m["tok_s"], m["tok_s_per_gpu"], eff, m["peak_mem_gib"]])
    lines.append(C.md_table(["GPUs", "looping", "accum", "ms/step", "tok/s total", "tok/s per GPU", "efficiency", "peak GiB"], rows))
    for n, sc in res["scaling"].items():
        if "weighted" in sc:
            lines.append(f"{n} GPUs, time-weighted scaling efficiency: {100 * sc['weighted']:.1f}%.\n")
        if sc.get("loss_max_abs_diff") is not None:
            lines.append(f"Loss 1 vs {n} GPUs over {len(runs[1]['losses'])} steps: max |diff| {sc['loss_max_abs_diff']:.2e} "
                         f"(relative {sc['loss_max_rel_diff']:.2e}); 1 GPU {', '.join(f'{x:.4f}' for x in runs[1]['losses'])}; "
                         f"{n} GPUs {', '.join(f'{x:.4f}' for x in runs[n]['losses'])}.\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nprocs", default="1,2", help="GPU counts to run, first must be 1 (default 1,2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VAL", help="train_gpt env override")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU config (gloo on CPU)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per loop mode")
    ap.add_argument("--settle", type=int, default=2, help="untimed steps after each mode switch (the first one compiles)")
    ap.add_argument("--loss-steps", type=int, default=5, help="steps from the init whose losses are compared across GPU counts")
    ap.add_argument("--modes", default="off,on")
    ap.add_argument("--shard-tokens", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per torchrun launch")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    sys.exit(main())
