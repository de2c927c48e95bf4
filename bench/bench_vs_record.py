"""Our training against a record script, side by side on one GPU: same tokens, seed, batch, sequence length,
step count and schedule; per-step training loss, pre-quant val loss / val_bpb, ms/step and tokens/s.

  python3 bench/bench_vs_record.py --out OUT                     # prepare data, loss runs (3 seeds each), speed runs
  python3 bench/bench_vs_record.py --out OUT --parts speed --which record --steps 40
  python3 bench/bench_vs_record.py --prepare-only --data .carry/vsrec   # data only (CPU): carry it to the GPU

The record (default ../shared/reference/records/pr1855_train_gpt.py) runs with every hyperparameter its published
seed log prints (the log's "Hyperparameters:" block, keys the script reads from the environment), except the run
settings both get alike: SEED, ITERATIONS (step-based schedule, MAX_WALLCLOCK_SECONDS=0), TRAIN_BATCH_TOKENS,
TRAIN_SEQ_LEN, WARMUP_STEPS, logging, no TTT, plain sp8192 data with a byte sidecar (CASEOPS_ENABLED=1 only moves its byte
count to the sidecar, which its pre-quant eval needs), and PREQUANT_ONLY=1
(stop after the EMA pre-quant eval). It imports `flash_attn_interface` from bench/fa_standin (FA4 through
train_gpt's wrapper when usable: the same kernel as ours). Ours runs with its defaults plus DOC_ATTENTION=1 (the
record's in-document training layout) and EVAL_DOC_ATTENTION=off (the record's plain causal pre-quant eval), QUANT=rtn
(no Hessians before the pre-quant eval) and is stopped after its `event:prequant` line.

Data (--data, built once from --source shards, default data/datasets/local_sp8192 from data/build_local_sample.sh):
one train shard starting with a BOS and truncated to a multiple of the loss runs' micro-batch span (tokens+1), so both
loaders read identical micro-batches in the same order across wraps; val truncated to k*TRAIN_SEQ_LEN+1 tokens so both
score the same targets; the tokenizer copied beside them (the folder is self-contained for the device's carry).

Outputs in --out: bench_vs_record.json (every parsed number), bench_vs_record.md (tables), bench_vs_record_runs.log
(the stdout of every run). Each file is rewritten after every run, so a timeout keeps what was measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STANDIN = ROOT / "bench" / "fa_standin"
PROFILE_HOOK = ROOT / "bench" / "profile_hook"  # sitecustomize: torch.profiler around chosen optimizer steps
DEFAULT_RECORD = SHARED / "reference" / "records" / "pr1855_train_gpt.py"
RECORD_LOGS = {"pr1855_train_gpt.py": "pr1855_train_seed42.log", "pr1868_train_gpt.py": "pr1868_train_seed42_rerun_gptq8s.log"}
sys.path.insert(0, str(ROOT / "bench"))

from _common import md_table, tg  # noqa: E402

# Record hyperparameters that are paths / process facts or that this harness sets itself.
RUN_KEYS = {"SEED", "ITERATIONS", "MAX_WALLCLOCK_SECONDS", "TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LEN", "WARMUP_STEPS",
            "TRAIN_LOG_EVERY", "VAL_LOSS_EVERY", "GPTQ_RESERVE_SECONDS", "TTT_ENABLED", "CASEOPS_ENABLED", "DATA_PATH",
            "TOKENIZER_PATH", "DATA_DIR", "ARTIFACT_DIR", "RUN_ID", "VOCAB_SIZE", "ENABLE_LOOPING_AT", "EVAL_SEQ_LEN",
            "RANK", "WORLD_SIZE", "LOCAL_RANK"}


# ---------------------------------------------------------------------------------------------- data
def prepare_data(source: Path, tokenizer: Path, out: Path, micro_tokens: int, seq_len: int, bos_id: int = 1) -> dict:
    """Write out/fineweb_{train,val}_000000.bin and out/tokenizer.model (see the module doc)."""
    train = np.concatenate([np.asarray(tg.load_shard(f)) for f in tg.shard_files(str(source), "train")])
    val = np.concatenate([np.asarray(tg.load_shard(f)) for f in tg.shard_files(str(source), "val")])
    first = np.flatnonzero(train == bos_id)
    if first.size == 0:
        raise SystemExit(f"{source}: no BOS ({bos_id}) in the train shards")
    train = train[first[0]:]
    span = micro_tokens + 1
    if train.size < span:
        raise SystemExit(f"{source}: {train.size} train tokens < one micro-batch span {span}")
    train = train[: train.size // span * span]
    n_val = (val.size - 1) // seq_len * seq_len
    if n_val <= 0:
        raise SystemExit(f"{source}: val has {val.size} tokens, fewer than TRAIN_SEQ_LEN+1={seq_len + 1}")
    val = val[: n_val + 1]
    out.mkdir(parents=True, exist_ok=True)
    tg.write_shard(out / "fineweb_train_000000.bin", train)
    tg.write_shard(out / "fineweb_val_000000.bin", val)
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    sidecar = write_byte_sidecar(val, tokenizer, out / "fineweb_val_bytes_000000.bin")
    info = dict(train_tokens=int(train.size), train_docs=int((train == bos_id).sum()), micro_span=span,
                micro_batches_per_epoch=int(train.size // span), val_tokens=int(val.size), val_targets=int(n_val),
                val_bytes=sidecar, source=str(source), tokenizer=str(tokenizer))
    (out / "prepared.json").write_text(json.dumps(info, indent=1))
    return info


def write_byte_sidecar(val: np.ndarray, tokenizer: Path, path: Path) -> int | None:
    """The record's pre-quant eval (eval_val) reads the per-token byte sidecar unconditionally, also on plain
    (non-CaseOps) data, where it is None and the run dies after training. Write one from the tokenizer's byte rule
    (entry j = bytes charged for token j after token j-1; 0 for the first), the same counts our LUTs give, and run
    the record with CASEOPS_ENABLED=1 (which only switches its byte counting to the sidecar). Returns the byte total
    of the val targets, or None (no sidecar) when the tokenizer cannot be read."""
    try:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    except (ImportError, OSError, RuntimeError):
        return None
    luts = tg.build_byte_luts(sp, sp.vocab_size())
    per = np.zeros(val.size, dtype=np.int64)
    per[1:] = tg.target_bytes(val[:-1].astype(np.int64), val[1:].astype(np.int64), luts)
    if per.max(initial=0) > np.iinfo(np.uint16).max:
        raise SystemExit(f"{tokenizer}: a token of more than 65535 bytes: no uint16 sidecar")
    tg.write_shard(path, per.astype(np.uint16))
    return int(per.sum())


# ---------------------------------------------------------------------------------------------- environments
def record_hparams(log_path: Path) -> dict[str, str]:
    """The 'Hyperparameters:' block of a record's log: {key: value as printed}."""
    out, inside = {}, False
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() == "Hyperparameters:":
            inside = True
            continue
        if inside:
            m = re.fullmatch(r"  (\w+): ?(.*)", line)
            if not m:
                break
            out[m.group(1)] = m.group(2)
    if not out:
        raise SystemExit(f"{log_path}: no 'Hyperparameters:' block")
    return out


def record_env_names(script: Path) -> set[str]:
    return set(re.findall(r"os\.environ\.get\(\s*\"([A-Z0-9_]+)\"", script.read_text(encoding="utf-8")))


def _env_value(v: str) -> str:
    return {"True": "1", "False": "0"}.get(v, v)


def record_env(hp: dict[str, str], names: set[str]) -> dict[str, str]:
    """The record's logged hyperparameters as env vars (only names the script reads, minus the run settings)."""
    return {k.upper(): _env_value(v) for k, v in hp.items() if k.upper() in names and k.upper() not in RUN_KEYS}


def profile_windows(spec: str, offset: int) -> str:
    """--profile "A:B,C:D" in training steps -> PROFILE_STEPS in optimizer steps from the process start."""
    out = []
    for w in spec.split(","):
        try:
            a, b = (int(x) for x in w.split(":"))
        except ValueError:
            raise SystemExit(f"--profile {spec!r}: expected A:B[,C:D] (training steps, A < B)") from None
        if not 0 <= a < b:
            raise SystemExit(f"--profile {spec!r}: expected A:B[,C:D] (training steps, A < B)")
        out.append(f"{a + offset}:{b + offset}")
    return ",".join(out)


def run_env(data: Path, seed: int, steps: int, batch_tokens: int, seq_len: int, warmup: int, log_every: int,
            loop_at: float) -> dict[str, str]:
    return dict(SEED=str(seed), ITERATIONS=str(steps), MAX_WALLCLOCK_SECONDS="0", TRAIN_BATCH_TOKENS=str(batch_tokens),
                TRAIN_SEQ_LEN=str(seq_len), EVAL_SEQ_LEN=str(seq_len), WARMUP_STEPS=str(warmup), TRAIN_LOG_EVERY=str(log_every),
                VAL_LOSS_EVERY="0", GPTQ_RESERVE_SECONDS="0", TTT_ENABLED="0", DATA_PATH=str(data),
                TOKENIZER_PATH=str(data / "tokenizer.model"), VOCAB_SIZE="8192", ENABLE_LOOPING_AT=str(loop_at))


OURS_FIXED = dict(DOC_ATTENTION="1", EVAL_DOC_ATTENTION="off", QUANT="rtn")


def _num(v):
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    s = str(v).strip()
    if s in ("True", "False"):
        return float(s == "True")
    try:
        return float(s)
    except ValueError:
        return s


def alignment(hp: dict[str, str], ours_cfg: "tg.Config", names: set[str]) -> dict:
    """Each record hyperparameter against ours of the same env name (or alias): same / differs / no counterpart."""
    ours = ours_cfg.to_dict()
    same, differ, missing = [], [], []
    for k, v in sorted(hp.items()):
        K = k.upper()
        if K not in names or K in RUN_KEYS:
            continue
        field = tg.ALIASES.get(K, K)
        if field not in ours:
            missing.append(dict(name=K, record=v))
            continue
        a, b = _num(v), _num(ours[field])
        ok = (a == b) if isinstance(a, str) or isinstance(b, str) else math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        (same if ok else differ).append(dict(name=K, ours_name=field, record=v, ours=ours[field]))
    return dict(same=same, differ=differ, record_only=missing)


# ---------------------------------------------------------------------------------------------- running + parsing
def run_process(cmd: list[str], env: dict[str, str], timeout: float, stop_pattern: str) -> tuple[str, str]:
    """Run with stdout+stderr captured; stop it (SIGTERM to its process group) once a line matches stop_pattern.
    Returns (output, status) with status ok | timeout | exit <rc>."""
    proc = subprocess.Popen(cmd, env=dict(os.environ, **env, PYTHONUNBUFFERED="1"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    out, status, deadline, stop = [], None, time.time() + timeout, re.compile(stop_pattern)
    while status is None:
        try:
            line = lines.get(timeout=max(0.05, min(1.0, deadline - time.time())))
        except queue.Empty:
            if time.time() > deadline:
                status = "timeout"
            continue
        if line is None:  # the process closed its output
            proc.wait()
            status = "ok" if any(stop.search(l) for l in out) else f"exit {proc.returncode}"
            break
        line = line.rstrip("\n")
        out.append(line)
        if stop.search(line):
            status = "ok"
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return "\n".join(out), status


RE_REC_TRAIN = re.compile(r"^(\d+)/\d+ train_loss: ([\d.naif]+) train_time: [\d.]+m tok/s: (\d+)")
RE_REC_LOOP = re.compile(r"^layer_loop:enabled step:(\d+)")
RE_REC_PRE = re.compile(r"diagnostic pre-quantization post-ema val_loss:([\d.]+) val_bpb:([\d.]+)")


def parse_record(out: str, batch_tokens: int) -> dict:
    """Per logged step: loss; wall time since the loop start, rebuilt from the cumulative tok/s (step*B/tok_s)."""
    losses, times, loop_step, pre = {}, {}, None, None
    for line in out.splitlines():
        if m := RE_REC_TRAIN.match(line):
            s = int(m.group(1))
            losses[s] = float(m.group(2))
            times[s] = s * batch_tokens / max(int(m.group(3)), 1)
        elif m := RE_REC_LOOP.match(line):
            loop_step = int(m.group(1))
        elif m := RE_REC_PRE.search(line):
            pre = dict(val_loss=float(m.group(1)), val_bpb=float(m.group(2)))
    return dict(loss=losses, time_s=times, loop_step=loop_step, prequant=pre)


def parse_ours(out: str) -> dict:
    losses, times, loop_step, pre, env = {}, {}, None, None, {}
    for line in out.splitlines():
        if not line.startswith("event:"):
            continue
        kv = dict(p.split(":", 1) for p in line.split(" ") if ":" in p)
        ev = kv.get("event")
        if ev == "train":
            s = int(kv["step"])
            losses[s] = float(kv["loss"])
            times[s] = float(kv["elapsed_s"])
        elif ev == "layer_loop":
            loop_step = int(kv["step"])
        elif ev == "prequant":
            pre = dict(val_loss=float(kv["val_loss"]), val_bpb=float(kv["val_bpb"]))
        elif ev == "env":
            env = {k: kv[k] for k in ("attention", "mlp_kernel", "device") if k in kv}
    return dict(loss=losses, time_s=times, loop_step=loop_step, prequant=pre, env=env)


def interval_speeds(times: dict[int, float], loop_step: int | None, batch_tokens: int, every: int = 1) -> dict:
    """ms/step over consecutive logged steps (those that are multiples of `every`, e.g. 10 for the record's
    integer cumulative tok/s), split by loop mode. Dropped: intervals starting at step <= 1 and the interval holding
    the first looped step (first-call effects; the record compiles there when run with WARMUP_STEPS=0). Median per mode."""
    steps = [s for s in sorted(times) if s % every == 0]
    per = {"off": [], "on": []}
    for a, b in zip(steps, steps[1:]):
        if a < 2:
            continue
        mode = "on" if loop_step is not None and a > loop_step else "off"
        if loop_step is not None and a <= loop_step < b:
            continue
        per[mode].append(1000 * (times[b] - times[a]) / (b - a))
    out = {}
    for mode, ms in per.items():
        if ms:
            med = statistics.median(ms)
            out[mode] = dict(ms_step=med, tok_s=batch_tokens / (med / 1000), n_intervals=len(ms), ms_all=ms)
    return out


# ---------------------------------------------------------------------------------------------- summaries
def loss_summary(runs: list[dict], steps: int, a: str = "ours", b: str = "record") -> dict:
    """Per-step training loss of the runs labelled `a` against those labelled `b` (label = run["label"], default the
    script): means over seeds, their difference, and the seed-to-seed noise it is to be compared with."""
    by = {w: [r for r in runs if r.get("label", r["which"]) == w and r["part"] == "loss" and r["loss"]] for w in (a, b)}
    if not by[a] or not by[b]:
        return {}
    common = sorted(set.intersection(*(set(r["loss"]) for r in by[a] + by[b])))
    mean = {w: {s: statistics.fmean(r["loss"][s] for r in by[w]) for s in common} for w in by}
    sd = {w: {s: statistics.stdev([r["loss"][s] for r in by[w]]) if len(by[w]) > 1 else float("nan") for s in common} for w in by}
    diff = {s: mean[a][s] - mean[b][s] for s in common}
    windows = {}
    for lo, hi in ((1, 10), (11, 50), (51, 100), (101, 150), (151, steps)):
        d = [diff[s] for s in common if lo <= s <= hi]
        if d:
            windows[f"{lo}-{min(hi, common[-1])}"] = dict(mean_diff=statistics.fmean(d), mean_abs_diff=statistics.fmean(abs(x) for x in d))
    noise = {w: statistics.fmean(sd[w].values()) if len(by[w]) > 1 else None for w in by}
    # how far b's mean curve lies from a's seeds, in units of a's seed-to-seed std (when a has >= 2 seeds)
    z = [abs(diff[s]) / sd[a][s] for s in common if len(by[a]) > 1 and sd[a][s] > 0]
    pre = {w: dict(val_loss=[r["prequant"]["val_loss"] for r in by[w] if r.get("prequant")],
                   val_bpb=[r["prequant"]["val_bpb"] for r in by[w] if r.get("prequant")]) for w in by}
    worst = max(common, key=lambda s: abs(diff[s]))
    return dict(a=a, b=b, steps=common, seeds={w: [r["seed"] for r in by[w]] for w in by}, mean_loss=mean, std_loss=sd,
                mean_diff=statistics.fmean(diff.values()), mean_abs_diff=statistics.fmean(abs(x) for x in diff.values()),
                max_abs_diff=abs(diff[worst]), max_abs_diff_step=worst, seed_noise_mean_std=noise, windows=windows,
                within_2_std_frac=(sum(v < 2 for v in z) / len(z)) if z else None, prequant=pre)


def speed_summary(runs: list[dict]) -> dict:
    """Per script and loop mode: median ms/step over the runs that had the GPU alone (speed runs, and loss runs run
    with --parallel 1)."""
    out = {}
    for w in ("ours", "record"):
        rs = [r for r in runs if r["which"] == w and r.get("speed") and (r["part"] == "speed" or r.get("concurrent") == 1)]
        for mode in ("off", "on"):
            vals = [r["speed"][mode]["ms_step"] for r in rs if mode in r["speed"]]
            if vals:
                out.setdefault(w, {})[mode] = dict(ms_step=statistics.median(vals), runs=len(vals), tok_s=rs[0]["batch_tokens"] / (statistics.median(vals) / 1000))
    if "ours" in out and "record" in out:
        ratio = {m: out["record"][m]["ms_step"] / out["ours"][m]["ms_step"] for m in ("off", "on") if m in out["ours"] and m in out["record"]}
        if len(ratio) == 2:  # a real run: looping off for 35 % of the wallclock, on for 65 % (ENABLE_LOOPING_AT=0.35)
            tw = {w: 0.35 * out[w]["off"]["tok_s"] + 0.65 * out[w]["on"]["tok_s"] for w in ("ours", "record")}
            ratio["time_weighted"] = tw["ours"] / tw["record"]
        out["ratio_ours_over_record_tok_s"] = ratio
    return out


def write_outputs(out_dir: Path, res: dict):
    (out_dir / "bench_vs_record.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "bench_vs_record.md").write_text(markdown(res))


def markdown(res: dict) -> str:
    lines = [f"# ours vs {res['record']} ({res.get('device', '?')})", "",
             f"data: {res.get('data', {})}", "", "## runs", ""]
    rows = [[r["which"], r["part"], r["seed"], r["batch_tokens"], r["steps"], r["status"], r.get("seconds"),
             (r.get("prequant") or {}).get("val_loss"), (r.get("prequant") or {}).get("val_bpb"), r.get("loop_step")]
            for r in res["runs"]]
    lines.append(md_table(["script", "part", "seed", "tokens/step", "steps", "status", "wall s", "pre-quant val_loss",
                           "val_bpb", "loop from step"], rows))
    for key in ("loss_summary", "kernel_check"):
        ls = res.get(key) or {}
        if not ls:
            continue
        A, B = ls["a"], ls["b"]
        lines += [f"## training loss per step: {A} vs {B} (mean over seeds {ls['seeds']})", "",
                  f"{A} - {B}: mean {ls['mean_diff']:+.4f}, mean |diff| {ls['mean_abs_diff']:.4f}, max |diff| "
                  f"{ls['max_abs_diff']:.4f} (step {ls['max_abs_diff_step']}); seed-to-seed std per step, mean over steps: "
                  f"{ls['seed_noise_mean_std']}; steps where |diff| < 2 std of {A}'s seeds: {ls['within_2_std_frac']}", ""]
        lines.append(md_table(["steps", "mean diff", "mean |diff|"], [[k, v["mean_diff"], v["mean_abs_diff"]] for k, v in ls["windows"].items()]))
        pick = [s for s in ls["steps"] if s <= 5 or s % 25 == 0 or s == ls["steps"][-1]]
        lines.append(md_table(["step", A, f"{A} std", B, f"{B} std", "diff"],
                              [[s, ls["mean_loss"][A][s], ls["std_loss"][A][s], ls["mean_loss"][B][s],
                                ls["std_loss"][B][s], ls["mean_loss"][A][s] - ls["mean_loss"][B][s]] for s in pick]))
        pq = ls["prequant"]
        lines.append(md_table(["pre-quant (EMA)", "val_loss per seed", "val_bpb per seed"],
                              [[w, ", ".join(f"{v:.4f}" for v in pq[w]["val_loss"]), ", ".join(f"{v:.4f}" for v in pq[w]["val_bpb"])] for w in pq]))
    sp = res.get("speed_summary") or {}
    if sp:
        lines += ["## speed (after compile; median of logged intervals)", ""]
        lines.append(md_table(["script", "looping", "ms/step", "tok/s", "runs"],
                              [[w, m, v["ms_step"], v["tok_s"], v["runs"]] for w in ("ours", "record") if w in sp for m, v in sp[w].items()]))
        if "ratio_ours_over_record_tok_s" in sp:
            lines.append(f"ours / record tokens/s: {json.dumps({k: round(v, 4) for k, v in sp['ratio_ours_over_record_tok_s'].items()})}\n")
    for r in res["runs"]:
        for win, pr in (r.get("profile") or {}).items():
            lines += [f"## profile: {r['which']} {win} ({pr['steps']} steps; {pr['device']} self time {pr['device_ms_per_step']:.1f} ms/step)", ""]
            lines.append(md_table(["kernel / op", "ms/step", "calls/step"],
                                  [[k["name"][:90], k["ms_per_step"], k["calls_per_step"]] for k in pr["kernels"][:25]]))
    al = res.get("alignment") or {}
    if al:
        lines += ["## hyperparameters: record's log vs our config", "",
                  f"same: {len(al['same'])}; differ: {len(al['differ'])}; record only (no counterpart in ours): {len(al['record_only'])}", ""]
        lines.append(md_table(["name", "record", "ours"], [[d["name"], d["record"], d["ours"]] for d in al["differ"]]))
        lines.append("record only: " + ", ".join(f"{d['name']}={d['record']}" for d in al["record_only"]) + "\n")
    return "\n".join(lines) + "\n"


def merge(files: list[Path], out: Path, steps: int) -> int:
    """Pool the runs of several result files (e.g. one device call each) and recompute every summary. Speeds of
    loss runs that had the GPU alone are recomputed from their logged times (10-step intervals)."""
    res, runs = None, []
    for f in files:
        d = json.loads(f.read_text())
        res = res or {k: v for k, v in d.items() if k != "runs"}
        for r in d["runs"]:
            r["loss"] = {int(k): v for k, v in r["loss"].items()}
            r["time_s"] = {int(k): v for k, v in r["time_s"].items()}
            r["source"] = f.name
            kernel = (r.get("env") or {}).get("attention")
            r["label"] = r["which"] if r["which"] == "record" or kernel in (None, "fa4") else f"ours_{kernel}"
            if r.get("concurrent") == 1 and r["part"] == "loss" and r["time_s"]:
                r["speed"] = interval_speeds(r["time_s"], r["loop_step"], r["batch_tokens"], 10)
            runs.append(r)
    res["runs"] = sorted(runs, key=lambda r: (r["part"], r["which"], r["seed"], r["source"]))
    res["merged_from"] = [f.name for f in files]
    res["loss_summary"] = loss_summary(res["runs"], steps)
    others = sorted({r["label"] for r in runs} - {"ours", "record"})
    if others:  # ours on another attention kernel (no flash-attn-4 on that lease): the same training?
        res["kernel_check"] = loss_summary(res["runs"], steps, others[0], "ours")
    res["speed_summary"] = speed_summary(res["runs"])
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, res)
    print((out / "bench_vs_record.md").read_text(), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="results folder")
    ap.add_argument("--record", type=Path, default=DEFAULT_RECORD, help="record script")
    ap.add_argument("--record-log", type=Path, help="its seed log (default: the one beside it)")
    ap.add_argument("--data", type=Path, default=ROOT / ".carry" / "vsrec_sp8192", help="prepared data folder")
    ap.add_argument("--source", type=Path, default=ROOT / "data" / "datasets" / "local_sp8192", help="shards to prepare from")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "data" / "tokenizers" / "fineweb_8192_bpe.model")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--runs-dir", type=Path, help="the runs' own folders (default OUT/runs)")
    ap.add_argument("--parts", default="loss,speed", help="loss,speed")
    ap.add_argument("--which", default="record,ours", help="record,ours (order of the runs)")
    ap.add_argument("--seeds", default="1,2,3", help="loss-run seeds")
    ap.add_argument("--steps", type=int, default=200, help="loss-run steps")
    ap.add_argument("--loss-batch-tokens", type=int, default=131072, help="tokens/step of the loss runs (8 micro-steps)")
    ap.add_argument("--speed-steps", type=int, default=40)
    ap.add_argument("--speed-batch-tokens", type=int, default=786432, help="8 micro-steps of the 8xH100 per-GPU shape")
    ap.add_argument("--speed-log-every", type=int, default=5)
    ap.add_argument("--speed-seed", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2, help="WARMUP_STEPS of both (compile, rolled back)")
    ap.add_argument("--ours-set", action="append", default=[], help="extra env for ours, K=V (repeatable)")
    ap.add_argument("--record-set", action="append", default=[], help="extra env for the record, K=V (repeatable)")
    ap.add_argument("--parallel", type=int, default=1, help="loss runs at once on the one GPU (timings of loss runs are not used)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per run")
    ap.add_argument("--budget", type=float, default=0, help="stop starting runs after this many seconds (0 = none)")
    ap.add_argument("--profile", default="", help="A:B[,C:D]: kernel profile of speed-run training steps A..B of both scripts "
                    "(bench/profile_hook; tables in the run folders; those steps run slower)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--merge", type=Path, nargs="+", help="recompute the summaries from earlier bench_vs_record.json files "
                    "(their runs pooled) into --out; runs nothing")
    a = ap.parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out, a.steps)
    micro = a.loss_batch_tokens // 8
    if not (a.data / "fineweb_train_000000.bin").exists() or a.prepare_only:
        if not a.source.exists():
            build = ROOT / "data" / "build_local_sample.sh"
            subprocess.run(["bash", str(build)], check=True, env=dict(os.environ, OUT_DIR=str(a.source)))
        info = prepare_data(a.source, a.tokenizer, a.data, micro, a.seq_len)
        print("event:prepared " + " ".join(f"{k}:{v}" for k, v in info.items()), flush=True)
        if a.prepare_only:
            return 0
    if a.out is None:
        ap.error("--out is required unless --prepare-only")
    a.out.mkdir(parents=True, exist_ok=True)
    info = json.loads((a.data / "prepared.json").read_text())
    if info["micro_span"] != micro + 1:
        print(f"WARNING: {a.data} was prepared for micro-batches of {info['micro_span'] - 1} tokens, the loss runs use {micro}: "
              "the two loaders diverge after the first wrap of the train shard", flush=True)
    log_path = a.record_log or a.record.parent / RECORD_LOGS.get(a.record.name, "")
    hp = record_hparams(log_path)
    names = record_env_names(a.record)
    rec_env = record_env(hp, names)
    extra = lambda sets: dict(s.split("=", 1) for s in sets)
    if a.profile and extra(a.record_set).get("WARMUP_STEPS", str(a.warmup)) != "0" and "record" in a.which:
        raise SystemExit("--profile counts the record's optimizer steps from its start: run it with --record-set WARMUP_STEPS=0 "
                         "(its warmup steps its optimizers a number of times this harness does not know)")
    ours_cfg = tg.Config.from_env(dict(run_env(a.data, 1, a.steps, a.loss_batch_tokens, a.seq_len, a.warmup, 1, 0.35), **OURS_FIXED, **extra(a.ours_set)), warn=lambda m: None)
    res = dict(record=a.record.name, record_log=log_path.name, data=info, runs=[], alignment=alignment(hp, ours_cfg, names),
               record_env=rec_env, ours_fixed=OURS_FIXED, ours_set=a.ours_set, record_set=a.record_set)
    try:
        import torch
        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        pass
    plan = []
    for part in a.parts.split(","):
        seeds = [int(s) for s in a.seeds.split(",")] if part == "loss" else [a.speed_seed]
        for seed in seeds:
            for which in a.which.split(","):
                plan.append((part, which, seed))
    t_start, lock = time.time(), threading.Lock()
    runs_dir = a.runs_dir or a.out / "runs"
    runlog = open(a.out / "bench_vs_record_runs.log", "w")

    def one(part: str, which: str, seed: int):
        if a.budget and time.time() - t_start > a.budget:
            print(f"event:skip part:{part} which:{which} seed:{seed} reason:budget", flush=True)
            return
        steps, bt = (a.steps, a.loss_batch_tokens) if part == "loss" else (a.speed_steps, a.speed_batch_tokens)
        log_every = 1 if part == "loss" else a.speed_log_every
        loop_at = 0.35 if part == "loss" else 0.5
        env = run_env(a.data, seed, steps, bt, a.seq_len, a.warmup, log_every, loop_at)
        if which == "record":
            caseops = "1" if (a.data / "fineweb_val_bytes_000000.bin").is_file() else "0"  # bytes from the sidecar (write_byte_sidecar)
            env = {**rec_env, **env, "CASEOPS_ENABLED": caseops, "PREQUANT_ONLY": "1", "ARTIFACT_DIR": str(runs_dir / f"rec_{part}_{seed}"),
                   "RUN_ID": f"rec_{part}_{seed}", "PYTHONPATH": os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")]),
                   **extra(a.record_set)}
            cmd, stop = [a.python, str(a.record)], r"PREQUANT_ONLY=1|diagnostic pre-quantization post-ema"
        else:
            env = {**env, **OURS_FIXED, "RUN_DIR": str(runs_dir / f"ours_{part}_{seed}"), **extra(a.ours_set)}
            cmd, stop = [a.python, str(ROOT / "train_gpt.py")], r"^event:prequant "
        if a.profile and part == "speed":  # windows in training steps; ours also steps its optimizers in the warmup
            offset = 0 if which == "record" else int(env["WARMUP_STEPS"]) * len(tg.train_warmup_plan(ours_cfg))
            env = {**env, "PROFILE_STEPS": profile_windows(a.profile, offset), "PROFILE_OUT": str(runs_dir / f"{which}_profile"),
                   "PROFILE_TAG": which, "PYTHONPATH": os.pathsep.join([str(PROFILE_HOOK), env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))])}
        print(f"event:run part:{part} which:{which} seed:{seed} steps:{steps} batch_tokens:{bt}", flush=True)
        t0 = time.time()
        out, status = run_process(cmd, env, a.timeout, stop)
        parsed = parse_record(out, bt) if which == "record" else parse_ours(out)
        r = dict(which=which, part=part, seed=seed, steps=steps, batch_tokens=bt, status=status, seconds=round(time.time() - t0, 1),
                 concurrent=a.parallel if part == "loss" else 1, **parsed)
        pdir = Path(env.get("PROFILE_OUT", ""))
        if "PROFILE_STEPS" in env and pdir.is_dir():
            r["profile"] = {f.stem: json.loads(f.read_text()) for f in sorted(pdir.glob("*.json"))}
        if part == "speed" or a.parallel == 1:
            r["speed"] = interval_speeds(parsed["time_s"], parsed["loop_step"], bt, 1 if part == "speed" else 10)
        tail = [l for l in out.splitlines() if "Error" in l or "error" in l][-3:]
        with lock:
            print(f"event:done part:{part} which:{which} seed:{seed} status:{status} seconds:{r['seconds']} "
                  f"logged_steps:{len(parsed['loss'])} prequant:{parsed['prequant']} speed:{ {m: round(v['ms_step'], 2) for m, v in r.get('speed', {}).items()} }"
                  + (f" errors:{tail}" if status != "ok" else ""), flush=True)
            runlog.write(f"\n===== {which} {part} seed {seed} ({status}) =====\n{out}\n")
            runlog.flush()
            res["runs"].append(r)
            res["runs"].sort(key=lambda r: (r["part"], r["which"], r["seed"]))
            res["loss_summary"] = loss_summary(res["runs"], a.steps)
            res["speed_summary"] = speed_summary(res["runs"])
            write_outputs(a.out, res)

    # Loss runs may share the GPU (--parallel: their timings are not used); speed runs always run alone.
    loss_plan = [p for p in plan if p[0] == "loss"]
    with ThreadPoolExecutor(max_workers=max(1, a.parallel)) as pool:
        list(pool.map(lambda p: one(*p), loss_plan))
    for p in plan:
        if p[0] != "loss":
            one(*p)
    runlog.close()
    write_outputs(a.out, res)
    print((a.out / "bench_vs_record.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
