#!/usr/bin/env python3
"""Build (or check) a Parameter Golf records folder from finished run directories.

Usage
-----
    python tools/make_record.py RUN_DIR [RUN_DIR ...] --name MyIdea \\
        [--author "Jane Doe"] [--github-id jdoe] [--blurb "..."] [--date YYYY-MM-DD] \\
        [--track 10min_16mb|non_record_16mb] [--out PARENT] [--force] \\
        [--ref-bpb 1.0611 --ref-bpb-std 0.0009 --ref-n 3 | --ref-values 1.0605 1.0612 1.0616 \\
         | --ref-loss-values ... | --ref-record records/track_10min_16mb/2026-04-27_X] \\
        [--threshold-nats 0.005] [--method-file notes.md] [--credits "..."]
    python tools/make_record.py --check records/track_10min_16mb/2026-05-01_MyIdea

Every RUN_DIR is one seed of the same configuration, written by train_gpt.py (see
docs/FORMATS.md and tools/contract.py): summary.json, train.log, train_gpt.py (the counted code file) and
final_model.ptz.  The tool writes records/track_<track>/<date>_<name>/ with

    README.md            per-seed results table + Method / Compliance / Requirements /
                         Reproduce / Credits sections (Method and Credits are skeletons)
    submission.json      the canonical schema below
    train_seed<SEED>.log byte copy of each run's train.log
    train_gpt.py         byte copy of the run dir's code file (all seeds share one sha256)
    requirements.txt     the repo's requirements.txt, else a pinned list derived from the code

It builds everything in a temporary folder next to the destination, validates the temporary
folder with the same checks as --check, and renames it into place at the end.  An existing
folder is never overwritten unless --force is given.

Refusals (exit status 1, nothing written)
-----------------------------------------
* a summary.json misses a required field (REQUIRED_SUMMARY_FIELDS) or has a wrong type;
* bytes_total > 16,000,000, or bytes_total != bytes_model + bytes_code;
* train_plus_hessian_seconds > the run's limit (max_wallclock_seconds; 600 when 0/null; the
  10min_16mb track never allows more than 600) or eval_seconds > max_eval_seconds (same rule);
* the configs differ (keys in PER_RUN_CONFIG_KEYS and --ignore-config-key are not compared),
  or the runs used different code (code_sha256) or final metrics;
* the run dir's train_gpt.py does not hash to the summary's and the log's code_sha256, or its
  size differs from bytes_code;
* two run dirs have the same seed (or summary seed != config SEED);
* the log disagrees with the summary (final/prequant/roundtrip/sliding/ttt metrics, bytes,
  steps, train time), or the final metric does not equal the metric it names;
* 10min_16mb track only: the run is not world_size 8 on CUDA with MAX_WALLCLOCK_SECONDS=600, or it
  scored a truncated validation set (valid_score false: VAL_MAX_TOKENS > 0);
* --ref-record scored another validation set or tokenizer (val_tokens / val_bytes differ);
* the destination exists and --force was not given.

submission.json schema (schema_version 1)
-----------------------------------------
Required (all records):
    schema_version     int, 1
    author, github_id, name, blurb   str
    date               "YYYY-MM-DD"
    track              "10min_16mb" | "non_record_16mb"
    val_loss, val_bpb  float: mean over seeds of the final metric (final_val_loss/final_val_bpb)
    val_loss_std, val_bpb_std   float: sample std (n-1) over seeds, 0.0 for one seed
    final_metric       "roundtrip" | "sliding" | "ttt" (which eval gives val_loss/val_bpb)
    seeds              [int], in the order given
    seed_results       {"<seed>": {val_loss, val_bpb, prequant_val_bpb, quant_val_bpb,
                        sliding_val_bpb (float|null), ttt_val_bpb (float|null),
                        artifact_bytes (=bytes_total of the run), steps, step_avg_ms,
                        train_time_s (=train_plus_hessian_seconds), eval_time_s}}
    bytes_total        int: max artifact_bytes over seeds
    bytes_code         int: size of train_gpt.py in the folder (counted code)
    code_sha256        str: sha256 of train_gpt.py (equals every log's event:env code_sha256)
    val_tokens, val_bytes   int|null: size of the scored val set (for BPB <-> nats)
    hardware           str, e.g. "8x NVIDIA H100 80GB HBM3"
    pytorch_version    str;  cuda_version  str|null
    compliance         {train_under_600s, eval_under_600s, artifact_under_16mb,
                        no_val_in_training, score_first_ttt, code_hash_matches}: bool
Optional, present only when a reference was given (see tools/record_stats.py):
    reference          {source: str, unit: "bpb"|"loss", mean, std, n, values: [float]|null}
    comparison_baseline_bpb   float|null   reference mean in BPB
    threshold_nats     float (0.005)
    delta_vs_reference_bpb    float|null   ours - reference (negative = better)
    delta_vs_reference_nats   float        same in nats per token
    t_statistic, welch_df, p_value   float|null  one-sided Welch test of
                       H0: improvement <= threshold_nats  vs  H1: improvement > threshold_nats
                       (null with fewer than 2 seeds)
"""
from __future__ import annotations

import argparse
import ast
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record_stats as stats  # noqa: E402
from contract import (BYTES_LIMIT as SIZE_LIMIT, FINAL_METRICS, NUM, SUMMARY_FIELDS, as_bool, atomic_write_bytes,  # noqa: E402
                      atomic_write_text, check_fields, env_value, last_event, read_events as parse_log, validate_summary)

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT = 600.0
TRACKS = ("10min_16mb", "non_record_16mb")
SCHEMA_VERSION = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")

# Config keys that legitimately differ between the seeds of one submission.
PER_RUN_CONFIG_KEYS = ("SEED", "RUN_ID", "RUN_DIR", "ARTIFACT_DIR", "LOG_DIR", "OUTPUT_DIR")

# The summary.json fields a record needs (types: contract.SUMMARY_FIELDS).
REQUIRED_SUMMARY_FIELDS: dict[str, tuple[tuple, bool]] = {k: SUMMARY_FIELDS[k] for k in """
    seed code_sha256 code_bytes config world_size device torch_version cuda_version steps train_seconds
    hessian_seconds train_plus_hessian_seconds max_wallclock_seconds ms_per_step val_tokens val_bytes
    prequant_val_loss prequant_val_bpb quant_val_loss quant_val_bpb sliding_val_loss sliding_val_bpb ttt_val_loss
    ttt_val_bpb final_val_loss final_val_bpb final_metric eval_seconds max_eval_seconds bytes_model bytes_code
    bytes_total""".split()}

SEED_RESULT_FIELDS: dict[str, tuple[tuple, bool]] = {
    "val_loss": (NUM, False), "val_bpb": (NUM, False),
    "prequant_val_bpb": (NUM, False), "quant_val_bpb": (NUM, False),
    "sliding_val_bpb": (NUM, True), "ttt_val_bpb": (NUM, True),
    "artifact_bytes": ((int,), False), "steps": ((int,), False), "step_avg_ms": (NUM, False),
    "train_time_s": (NUM, False), "eval_time_s": (NUM, False),
}
COMPLIANCE_KEYS = ("train_under_600s", "eval_under_600s", "artifact_under_16mb",
                   "no_val_in_training", "score_first_ttt", "code_hash_matches")
SUBMISSION_FIELDS: dict[str, tuple[tuple, bool]] = {
    "schema_version": ((int,), False),
    "author": ((str,), False), "github_id": ((str,), False), "name": ((str,), False),
    "blurb": ((str,), False), "date": ((str,), False), "track": ((str,), False),
    "val_loss": (NUM, False), "val_bpb": (NUM, False),
    "val_loss_std": (NUM, False), "val_bpb_std": (NUM, False),
    "final_metric": ((str,), False),
    "seeds": ((list,), False), "seed_results": ((dict,), False),
    "bytes_total": ((int,), False), "bytes_code": ((int,), False), "code_sha256": ((str,), False),
    "val_tokens": ((int,), True), "val_bytes": ((int,), True),
    "hardware": ((str,), False), "pytorch_version": ((str,), False), "cuda_version": ((str,), True),
    "compliance": ((dict,), False),
}
COMPARISON_FIELDS: dict[str, tuple[tuple, bool]] = {
    "reference": ((dict,), False), "comparison_baseline_bpb": (NUM, True),
    "threshold_nats": (NUM, False), "delta_vs_reference_bpb": (NUM, True),
    "delta_vs_reference_nats": (NUM, False), "t_statistic": (NUM, True),
    "welch_df": (NUM, True), "p_value": (NUM, True),
}


class RecordError(Exception):
    """A refusal: the message says what is wrong; nothing was written."""


# ---------------------------------------------------------------------------- helpers
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log_value_matches(text: str, value: Any) -> bool:
    """Does a number printed in a log equal `value` up to the precision it was printed with?"""
    if value is None:
        return False
    try:
        x = float(text)
    except ValueError:
        return False
    v = float(value)
    if not (math.isfinite(x) and math.isfinite(v)):
        return x == v
    t = text.strip().lower()
    mant, _, exp = t.partition("e")
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    tol = 0.5 * 10.0 ** (-decimals) * (10.0 ** int(exp) if exp else 1.0)
    return abs(x - v) <= tol * 1.000001 + 1e-12 * max(1.0, abs(v))


def _fmt(v: Any, nd: int = 5) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


# ---------------------------------------------------------------------------- loading runs
class Run:
    def __init__(self, run_dir: Path, summary: dict, events: dict):
        self.dir = run_dir
        self.summary = summary
        self.events = events

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])


def train_limit(summary: dict, track: str) -> float:
    lim = summary.get("max_wallclock_seconds")
    lim = float(lim) if lim else TIME_LIMIT  # 0/None = no cap in the script -> the 600 s rule
    return min(lim, TIME_LIMIT) if track == "10min_16mb" else lim


def eval_limit(summary: dict, track: str) -> float:
    lim = summary.get("max_eval_seconds")
    lim = float(lim) if lim else TIME_LIMIT
    return min(lim, TIME_LIMIT) if track == "10min_16mb" else lim


def load_run(run_dir: Path, track: str) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecordError(f"{run_dir}: not a directory")
    for fn in ("summary.json", "train.log", "train_gpt.py"):
        if not (run_dir / fn).is_file():
            raise RecordError(f"{run_dir}: missing {fn}")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{run_dir}/summary.json: unreadable ({e})") from None
    if not isinstance(summary, dict):
        raise RecordError(f"{run_dir}/summary.json: not a JSON object")
    problems = validate_summary(summary, REQUIRED_SUMMARY_FIELDS, f"{run_dir}/summary.json")
    if problems:
        raise RecordError("\n".join(problems))
    s = summary
    where = str(run_dir)
    errs = []
    # a score on a truncated validation set (VAL_MAX_TOKENS) is no challenge score: not for the record track
    if track == "10min_16mb" and s.get("valid_score") is False:
        errs.append(f"{where}: valid_score is false (VAL_MAX_TOKENS={s['config'].get('VAL_MAX_TOKENS')} truncated the validation "
                    f"set): rerun with VAL_MAX_TOKENS=0, or submit with --track non_record_16mb")
    if track == "10min_16mb":  # the record track is 8 GPUs, CUDA, a 600 s training budget
        why = [w for w, bad in ((f"world_size {s['world_size']} (not 8)", s["world_size"] != 8),
                                (f"device {s['device']!r} (not CUDA)", s.get("cuda_version") is None or s["device"] == "cpu"),
                                (f"MAX_WALLCLOCK_SECONDS {s.get('max_wallclock_seconds')} (not 600)",
                                 float(s.get("max_wallclock_seconds") or 0) != TIME_LIMIT)) if bad]
        if why:
            errs.append(f"{where}: not a record-track run: {', '.join(why)}; submit with --track non_record_16mb")
    # size
    if s["bytes_total"] > SIZE_LIMIT:
        errs.append(f"{where}: bytes_total {s['bytes_total']:,} > {SIZE_LIMIT:,} (artifact over the 16 MB cap)")
    if s["bytes_total"] != s["bytes_model"] + s["bytes_code"]:
        errs.append(f"{where}: bytes_total {s['bytes_total']} != bytes_model {s['bytes_model']} + bytes_code {s['bytes_code']}")
    # time
    tl = train_limit(s, track)
    if s["train_plus_hessian_seconds"] > tl:
        errs.append(f"{where}: train_plus_hessian_seconds {s['train_plus_hessian_seconds']:.2f} > limit {tl:.0f} s")
    el = eval_limit(s, track)
    if s["eval_seconds"] > el:
        errs.append(f"{where}: eval_seconds {s['eval_seconds']:.2f} > limit {el:.0f} s")
    # code file
    code = run_dir / "train_gpt.py"
    digest = sha256_file(code)
    if digest != s["code_sha256"]:
        errs.append(f"{where}: train_gpt.py sha256 {digest[:16]}… != summary code_sha256 {s['code_sha256'][:16]}…")
    size = code.stat().st_size
    if size != s["bytes_code"] or size != s["code_bytes"]:
        errs.append(f"{where}: train_gpt.py is {size} bytes but summary says bytes_code {s['bytes_code']} / code_bytes {s['code_bytes']}")
    # seed / metric consistency
    cfg_seed = s["config"].get("SEED")
    if cfg_seed is not None and int(cfg_seed) != s["seed"]:
        errs.append(f"{where}: summary seed {s['seed']} != config SEED {cfg_seed}")
    fm = s["final_metric"]  # one of FINAL_METRICS: validate_summary checked it
    pre = FINAL_METRICS[fm]
    for unit in ("loss", "bpb"):
        a, b = s[f"{pre}_val_{unit}"], s[f"final_val_{unit}"]
        if a is None or abs(a - b) > 1e-9 * max(1.0, abs(b)):
            errs.append(f"{where}: final_val_{unit} {b} != {pre}_val_{unit} {a} (final_metric {fm})")
    # log
    events = parse_log(run_dir / "train.log")
    errs += compare_log_to_summary(events, s, f"{where}/train.log", digest)
    if errs:
        raise RecordError("\n".join(errs))
    return Run(run_dir, summary, events)


def compare_log_to_summary(events: dict, s: dict, where: str, code_digest: str) -> list[str]:
    """Log lines vs summary.json of the same run."""
    return compare_log_to_seed_result(events, seed_result_from_summary(s), where, code_digest, s["bytes_code"],
                                      s["final_metric"], seed=s["seed"])


def compare_log_to_seed_result(events: dict, sr: dict, where: str, code_digest: str,
                               bytes_code: int, final_metric: str, seed: Optional[int]) -> list[str]:
    errs = []

    def need(name):
        ev = last_event(events, name)
        if ev is None:
            errs.append(f"{where}: no event:{name} line")
        return ev

    def same(ev, key, value, label):
        if ev is None:
            return
        if key not in ev:
            errs.append(f"{where}: event line lacks {key}")
        elif not log_value_matches(ev[key], value):
            errs.append(f"{where}: log {label} {ev[key]} != {value}")

    env = need("env")
    if env is not None:
        if env.get("code_sha256") != code_digest:
            errs.append(f"{where}: log code_sha256 {env.get('code_sha256')} != sha256 of train_gpt.py {code_digest}")
        same(env, "code_bytes", bytes_code, "code_bytes")
    cfg = last_event(events, "config")
    if cfg is not None and seed is not None and "SEED" in cfg and not log_value_matches(cfg["SEED"], seed):
        errs.append(f"{where}: log config SEED {cfg['SEED']} != seed {seed}")
    fin = need("final")
    if fin is not None:
        if fin.get("metric") != final_metric:
            errs.append(f"{where}: log final metric {fin.get('metric')} != {final_metric}")
        same(fin, "val_loss", sr["val_loss"], "final val_loss")
        same(fin, "val_bpb", sr["val_bpb"], "final val_bpb")
    same(need("prequant"), "val_bpb", sr["prequant_val_bpb"], "prequant val_bpb")
    same(need("roundtrip"), "val_bpb", sr["quant_val_bpb"], "roundtrip val_bpb")
    for name in ("sliding", "ttt"):
        val = sr.get(f"{name}_val_bpb")
        ev = last_event(events, name)
        if val is not None:
            same(need(name), "val_bpb", val, f"{name} val_bpb")
        elif ev is not None:
            errs.append(f"{where}: log has event:{name} but the result has no {name}_val_bpb")
    art = need("artifact")
    same(art, "bytes_total", sr["artifact_bytes"], "artifact bytes_total")
    same(art, "bytes_code", bytes_code, "artifact bytes_code")
    same(need("stop"), "step", sr["steps"], "stop step")
    gptq = last_event(events, "gptq")
    if gptq is not None:
        same(gptq, "train_plus_hessian_s", sr["train_time_s"], "train_plus_hessian_s")
    else:  # no Hessian pass: the training loop time is the counted time
        same(last_event(events, "stop"), "train_s", sr["train_time_s"], "stop train_s")
    return errs


def seed_result_from_summary(s: dict) -> dict:
    return dict(
        val_loss=float(s["final_val_loss"]),
        val_bpb=float(s["final_val_bpb"]),
        prequant_val_bpb=float(s["prequant_val_bpb"]),
        quant_val_bpb=float(s["quant_val_bpb"]),
        sliding_val_bpb=None if s["sliding_val_bpb"] is None else float(s["sliding_val_bpb"]),
        ttt_val_bpb=None if s["ttt_val_bpb"] is None else float(s["ttt_val_bpb"]),
        artifact_bytes=int(s["bytes_total"]),
        steps=int(s["steps"]),
        step_avg_ms=float(s["ms_per_step"]),
        train_time_s=float(s["train_plus_hessian_seconds"]),
        eval_time_s=float(s["eval_seconds"]),
    )


def config_differences(configs: list[tuple[str, dict]], ignore: set[str]) -> list[str]:
    base_name, base = configs[0]
    diffs = []
    for name, cfg in configs[1:]:
        keys = (set(base) | set(cfg)) - ignore
        for k in sorted(keys):
            if k not in base or k not in cfg:
                diffs.append(f"config key {k} present in only one of {base_name} / {name}")
            elif base[k] != cfg[k]:
                diffs.append(f"config {k}: {base[k]!r} ({base_name}) != {cfg[k]!r} ({name})")
    return diffs


def check_runs_consistent(runs: list[Run], ignore: set[str]) -> None:
    errs = []
    seen: dict[int, Path] = {}
    for r in runs:
        if r.seed in seen:
            errs.append(f"duplicate seed {r.seed}: {seen[r.seed]} and {r.dir}")
        seen[r.seed] = r.dir
    errs += config_differences([(str(r.dir), r.summary["config"]) for r in runs], ignore)
    shas = {r.summary["code_sha256"] for r in runs}
    if len(shas) > 1:
        errs.append("the runs used different code files (code_sha256 differs): "
                    + ", ".join(f"{r.dir}={r.summary['code_sha256'][:12]}" for r in runs))
    metrics = {r.summary["final_metric"] for r in runs}
    if len(metrics) > 1:
        errs.append(f"the runs report different final metrics: {sorted(metrics)}")
    if errs:
        raise RecordError("\n".join(errs))


# ---------------------------------------------------------------------------- reference / stats
def load_reference(args, bytes_per_tok: Optional[float], val: Optional[tuple] = None) -> Optional[dict]:
    given = [args.ref_bpb is not None, bool(args.ref_values), bool(args.ref_loss_values),
             args.ref_record is not None]
    if sum(given) == 0:
        if args.ref_bpb_std is not None or args.ref_n is not None:
            raise RecordError("--ref-bpb-std/--ref-n need --ref-bpb")
        return None
    if sum(given) > 1:
        raise RecordError("give only one of --ref-bpb, --ref-values, --ref-loss-values, --ref-record")
    if args.ref_bpb is not None:
        n = args.ref_n if args.ref_n is not None else 1
        std = args.ref_bpb_std if args.ref_bpb_std is not None else 0.0
        if n > 1 and args.ref_bpb_std is None:
            raise RecordError("--ref-n > 1 needs --ref-bpb-std")
        return dict(source="numbers", unit="bpb", mean=float(args.ref_bpb), std=float(std), n=int(n), values=None)
    if args.ref_values:
        vals = [float(v) for v in args.ref_values]
        m, sd, n = stats.describe(vals)
        return dict(source="values", unit="bpb", mean=m, std=sd, n=n, values=vals)
    if args.ref_loss_values:
        vals = [float(v) for v in args.ref_loss_values]
        m, sd, n = stats.describe(vals)
        return dict(source="values", unit="loss", mean=m, std=sd, n=n, values=vals)
    ref_dir = Path(args.ref_record)
    p = ref_dir / "submission.json" if ref_dir.is_dir() else ref_dir
    try:
        sub = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"--ref-record: cannot read {p} ({e})") from None
    theirs = (sub.get("val_tokens"), sub.get("val_bytes"))
    if val is not None and None not in theirs and tuple(theirs) != tuple(val):
        raise RecordError(f"--ref-record {p}: scored another validation set or tokenizer (val_tokens/val_bytes "
                          f"{theirs[0]:,}/{theirs[1]:,} vs ours {val[0]:,}/{val[1]:,}): a Welch test across them compares nothing")
    per_seed = sub.get("seed_results") or {}
    vals = [float(v["val_bpb"]) for v in per_seed.values() if isinstance(v, dict) and v.get("val_bpb") is not None]
    src = f"record:{ref_dir.name if ref_dir.is_dir() else p}"
    if len(vals) >= 1 and (len(vals) >= 2 or "val_bpb_std" not in sub):
        m, sd, n = stats.describe(vals)
        return dict(source=src, unit="bpb", mean=m, std=sd, n=n, values=vals)
    if sub.get("val_bpb") is None:
        raise RecordError(f"--ref-record: {p} has no val_bpb")
    n = len(sub.get("seeds") or []) or 1
    sd = float(sub.get("val_bpb_std") or 0.0)
    if n == 1:
        sd = 0.0
    return dict(source=src, unit="bpb", mean=float(sub["val_bpb"]), std=sd, n=n, values=None)


def compute_comparison(ref: dict, our_bpb: list[float], our_loss: list[float],
                       bytes_per_tok: Optional[float], threshold_nats: float) -> dict:
    out: dict[str, Any] = dict(reference=ref, threshold_nats=threshold_nats)
    if ref["unit"] == "bpb":
        if bytes_per_tok is None:
            raise RecordError("cannot convert BPB to nats: no val_tokens/val_bytes and no loss/bpb pair")
        out["comparison_baseline_bpb"] = ref["mean"]
        delta_bpb = stats.mean(our_bpb) - ref["mean"]
        out["delta_vs_reference_bpb"] = delta_bpb
        out["delta_vs_reference_nats"] = stats.bpb_to_nats(delta_bpb, bytes_per_tok)
        if len(our_bpb) >= 2:
            c = stats.compare_bpb(our_bpb, ref["mean"], ref["std"], ref["n"], bytes_per_tok, threshold_nats)
    else:
        out["comparison_baseline_bpb"] = (stats.nats_to_bpb(ref["mean"], bytes_per_tok)
                                          if bytes_per_tok else None)
        delta_nats = stats.mean(our_loss) - ref["mean"]
        out["delta_vs_reference_nats"] = delta_nats
        out["delta_vs_reference_bpb"] = (stats.nats_to_bpb(delta_nats, bytes_per_tok)
                                         if bytes_per_tok else None)
        if len(our_loss) >= 2:
            c = stats.compare_loss(our_loss, ref["mean"], ref["std"], ref["n"], bytes_per_tok, threshold_nats)
    if len(our_bpb) >= 2:  # Welch needs a sample std of our own
        out["t_statistic"] = _json_num(c["t_statistic"])
        out["welch_df"] = _json_num(c["welch_df"])
        out["p_value"] = c["p_value"]
    else:
        out["t_statistic"] = out["welch_df"] = out["p_value"] = None
    return out


def _json_num(x: float) -> Optional[float]:
    """JSON has no inf/nan: store those as null (happens only with zero variance on both sides)."""
    return x if math.isfinite(x) else None


def stats_text(sub: dict) -> str:
    lines = [f"val_bpb  mean {sub['val_bpb']:.6f}  std {sub['val_bpb_std']:.6f}  (n={len(sub['seeds'])})",
             f"val_loss mean {sub['val_loss']:.6f}  std {sub['val_loss_std']:.6f}"]
    if "reference" in sub:
        ref = sub["reference"]
        lines.append(f"reference ({ref['source']}, {ref['unit']}): mean {ref['mean']:.6f} std {ref['std']:.6f} n={ref['n']}")
        if sub.get("delta_vs_reference_bpb") is not None:
            lines.append(f"delta vs reference: {sub['delta_vs_reference_bpb']:+.6f} BPB = "
                         f"{sub['delta_vs_reference_nats']:+.6f} nats/token (negative = better)")
        else:
            lines.append(f"delta vs reference: {sub['delta_vs_reference_nats']:+.6f} nats/token")
        if sub.get("p_value") is not None:
            t, df = sub.get("t_statistic"), sub.get("welch_df")
            lines.append(f"one-sided Welch test, H0: improvement <= {sub['threshold_nats']} nats: "
                         f"t={_fmt(t, 4) if t is not None else 'inf'} df={_fmt(df, 2) if df is not None else 'inf'} "
                         f"p={sub['p_value']:.3g} -> {'significant' if sub['p_value'] < 0.01 else 'NOT significant'} at p<0.01")
        else:
            lines.append("t-test skipped: needs at least 2 seeds")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- requirements
_PIP_NAMES = {"sentencepiece": "sentencepiece", "numpy": "numpy", "brotli": "brotli",
              "zstandard": "zstandard", "torch": "torch", "flash_attn": "flash-attn",
              "flash_attn_interface": "flash-attn-3", "triton": "triton", "huggingface_hub": "huggingface-hub",
              "tqdm": "tqdm", "datasets": "datasets", "tiktoken": "tiktoken", "lz4": "lz4", "zstd": "zstd"}


def _code_imports(code_text: str) -> list[str]:
    try:
        import pack_code  # same folder
        src = pack_code.unpack_source(code_text)
        if src is not None:
            code_text = src
    except Exception:
        pass
    try:
        tree = ast.parse(code_text)
    except SyntaxError:
        return []
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    std = set(getattr(sys, "stdlib_module_names", ()))
    return sorted(m for m in mods if m not in std and m != "__future__")


def requirements_text(code_text: str, torch_version: str) -> str:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover
        metadata = None
    lines = ["# generated by tools/make_record.py from the imports of train_gpt.py",
             f"# the runs used torch {torch_version}"]
    mods = _code_imports(code_text)
    if "torch" not in mods:
        mods.append("torch")
    for m in sorted(set(mods)):
        pip = _PIP_NAMES.get(m, m)
        if m == "torch":
            lines.append(f"torch=={torch_version.split('+')[0]}")
            continue
        if m == "triton":  # ships with torch
            continue
        ver = None
        if metadata is not None:
            try:
                ver = metadata.version(pip)
            except Exception:
                ver = None
        lines.append(f"{pip}=={ver}" if ver else pip)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- README
_ATTN_INSTALL = {"fa3": "FlashAttention 3 (`flash_attn_interface`, built from the flash-attention repo's `hopper/`)",
                 "fa4": 'FlashAttention 4 (`pip install "flash-attn-4[cu13]"` on a CUDA 13 torch)',
                 "fa2": "FlashAttention 2 (`pip install flash-attn`)"}


def kernels_note(runs: list[Run]) -> str:
    """The attention and MLP backward kernels the runs logged (event:env attention: / mlp_kernel:, absent in
    older logs): step time depends on them."""
    envs = [last_event(r.events, "env") or {} for r in runs]
    logged = lambda key: sorted({e.get(key) for e in envs} - {None})  # noqa: E731
    note = ""
    if kinds := logged("attention"):
        note += f" Attention kernel in these runs (`event:env attention:`): {', '.join(f'`{k}`' for k in kinds)}."
        extra = [_ATTN_INSTALL[k] for k in kinds if k in _ATTN_INSTALL]
        if extra:
            note += (f" It is optional: install {' / '.join(extra)} to match the runs' step time; without it the script"
                     " attends with PyTorch SDPA (same model, a few % slower per step).")
    if mlp := logged("mlp_kernel"):
        note += f" MLP backward kernel (`event:env mlp_kernel:`): {', '.join(f'`{k}`' for k in mlp)}."
    return note


def readme_text(sub: dict, runs: list[Run], args, requirements: str) -> str:
    s0 = runs[0].summary
    cfg = s0["config"]
    ignore = set(PER_RUN_CONFIG_KEYS) | set(args.ignore_config_key or [])
    seeds = sub["seeds"]
    has_ttt = any(sub["seed_results"][str(x)]["ttt_val_bpb"] is not None for x in seeds)
    head = ["Seed", "Steps", "ms/step", "Train s", "Eval s", "Pre-quant BPB", "Post-quant BPB",
            "Sliding BPB"] + (["TTT BPB"] if has_ttt else []) + ["**Final val_bpb**", "val_loss", "Bytes total"]
    rows = []
    for seed in seeds:
        r = sub["seed_results"][str(seed)]
        rows.append([str(seed), str(r["steps"]), f"{r['step_avg_ms']:.1f}", f"{r['train_time_s']:.1f}",
                     f"{r['eval_time_s']:.1f}", _fmt(r["prequant_val_bpb"]), _fmt(r["quant_val_bpb"]),
                     _fmt(r["sliding_val_bpb"])] + ([_fmt(r["ttt_val_bpb"])] if has_ttt else [])
                    + [f"**{r['val_bpb']:.5f}**", f"{r['val_loss']:.5f}", f"{r['artifact_bytes']:,}"])
    n_cols = len(head)
    mean_row = ["**Mean**"] + [""] * (n_cols - 4) + [
        f"**{sub['val_bpb']:.5f} ± {sub['val_bpb_std']:.5f}**", f"{sub['val_loss']:.5f}",
        f"max {sub['bytes_total']:,}"]
    table = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * n_cols) + "|"]
    table += ["| " + " | ".join(r) + " |" for r in rows + [mean_row]]

    res = sub["seed_results"]
    max_train = max(res[str(x)]["train_time_s"] for x in seeds)
    max_eval = max(res[str(x)]["eval_time_s"] for x in seeds)
    max_hess = max(r.summary["hessian_seconds"] for r in runs)
    fm = sub["final_metric"]
    comp = sub["compliance"]
    ttt_on = fm == "ttt"
    tilt_on = as_bool(cfg.get("NGRAM_TILT_ENABLED", False)) is True

    comparison = ""
    if "reference" in sub:
        comparison = "\n### Comparison with the reference\n\n```\n" + stats_text(sub) + "\n```\n"
        comparison += ("\nUnits: val_bpb = val_loss / ln 2 × tokens/bytes, so a BPB delta is "
                       "delta_nats = delta_bpb × ln 2 × bytes/tokens"
                       + (f" (bytes/token of the val set = {sub['val_bytes'] / sub['val_tokens']:.6f})"
                          if sub.get("val_tokens") and sub.get("val_bytes") else "") + ".\n")

    env_items = [f"{k}={shlex.quote(env_value(v))}" for k, v in sorted(cfg.items()) if k not in ignore]
    env_block = "export \\\n  " + " \\\n  ".join(env_items) if env_items else ""
    nproc = s0["world_size"]
    method = Path(args.method_file).read_text().strip() if args.method_file else (
        "_TODO: describe the model, optimizer, quantization and evaluation in reasonable detail._")
    credits = args.credits or "_TODO: lineage and credits (PR numbers of the techniques used)._"

    if ttt_on:
        c1 = "Each token's distribution depends only on the artifact and the preceding val tokens; TTT adapts only on chunks that were already scored."
        c3 = "Score-first TTT: every chunk is scored with the current weights before any update that uses it (TTT_CHUNK_TOKENS chunks)."
    else:
        c1 = "A fixed predictor: each token's distribution depends only on the artifact and the preceding tokens (causal attention)."
        c3 = "No eval-time adaptation: nothing is updated during evaluation."
    c2 = "the score is the cross-entropy of a full softmax over the whole vocabulary."
    if tilt_on:
        c2 = ("the score is the cross-entropy of a normalized distribution over the whole vocabulary: the full softmax p, "
              "or, where the token-only n-gram tilt (`NGRAM_TILT_ENABLED=1`, PR #1514 / #2135) has a hint h, "
              "p'(a) = p(a)·e^{B[a=h]} / (1 + p(h)(e^B − 1)), which sums to 1. The hint of a target comes only from "
              "val tokens already scored (in phased TTT: earlier batches and the document's own earlier tokens), "
              "its table is built inside the eval timer, and no token's own value enters its hint.")
    text = f"""# {sub['name']}

{sub['blurb']}

**val_bpb {sub['val_bpb']:.5f}** (mean of {len(seeds)} seed{'s' if len(seeds) != 1 else ''}, std {sub['val_bpb_std']:.5f}; final metric: `{fm}`) · track `{sub['track']}` · {sub['hardware']} · artifact ≤ {sub['bytes_total']:,} bytes

## Results

{chr(10).join(table)}

Train s = training loop + GPTQ Hessian collection (`train_plus_hessian_seconds`, the part
that reads training data). Eval s = evaluation wallclock as reported by the script.
Pre-quant = EMA weights before quantization; post-quant = round-trip of the compressed
artifact; the final metric is `{fm}`.
{comparison}
## Method

{method}

## Compliance

- **C1 strict causality**: {c1}
- **C2 full normalized distribution**: {c2}
- **C3 score before update**: {c3}
- **C4 single left-to-right pass**: every val token is scored exactly once.
- **No validation data in training**: training and GPTQ calibration read only training shards;
  the val shards are read only by the evaluation.
- **Size**: max bytes_total {sub['bytes_total']:,} ≤ 16,000,000 (code {sub['bytes_code']:,} bytes
  + compressed model); the counted code is this folder's `train_gpt.py`
  (sha256 `{sub['code_sha256']}`, equal to `code_sha256` in every log).
- **Train time**: max {max_train:.1f} s ≤ 600 s including GPTQ Hessian collection (max {max_hess:.1f} s);
  compile warmup is excluded from the timer and uses no val data.
- **Eval time**: max {max_eval:.1f} s ≤ 600 s.
- Flags in `submission.json`: {", ".join(f"`{k}`={'true' if comp[k] else 'false'}" for k in COMPLIANCE_KEYS)}.

## Requirements

PyTorch {sub['pytorch_version']} (CUDA {sub['cuda_version'] or 'n/a'}), Python 3.{kernels_note(runs)}
`pip install -r requirements.txt`:

```
{requirements.strip()}
```

## Reproduce

With the exact configuration of these runs (every config value of the logs' `event:config`
line except the per-run keys; DATA_PATH / TOKENIZER_PATH are relative to the working
directory, adjust them to where the data is):

```bash
{env_block}
for SEED in {' '.join(str(x) for x in seeds)}; do
  SEED=$SEED torchrun --standalone --nproc_per_node={nproc} train_gpt.py
done
```

Each run writes `runs/<RUN_ID>/train.log` (copied here as `train_seed<SEED>.log`),
`final_model.ptz` and `summary.json`.

## Credits

{credits}
"""
    return text


# ---------------------------------------------------------------------------- build
def build_submission(runs: list[Run], args) -> dict:
    seeds = [r.seed for r in runs]
    seed_results = {str(r.seed): seed_result_from_summary(r.summary) for r in runs}
    bpb = [seed_results[str(x)]["val_bpb"] for x in seeds]
    loss = [seed_results[str(x)]["val_loss"] for x in seeds]
    s0 = runs[0].summary
    val_tokens = {r.summary["val_tokens"] for r in runs}
    val_bytes = {r.summary["val_bytes"] for r in runs}
    if len(val_tokens) > 1 or len(val_bytes) > 1:
        raise RecordError(f"the runs scored different val sets: val_tokens {sorted(val_tokens)}, val_bytes {sorted(val_bytes)}")
    torch_versions = sorted({r.summary["torch_version"] for r in runs})
    cuda_versions = sorted({str(r.summary["cuda_version"]) for r in runs})
    for label, vs in (("torch", torch_versions), ("cuda", cuda_versions)):
        if len(vs) > 1:
            print(f"WARNING: the runs used different {label} versions: {vs}", file=sys.stderr)
    devices = sorted({(r.summary["world_size"], r.summary["device"]) for r in runs})
    hardware = args.hardware or "; ".join(f"{w}x {d}" for w, d in devices)
    sub: dict[str, Any] = dict(
        schema_version=SCHEMA_VERSION,
        author=args.author, github_id=args.github_id, name=args.name, blurb=args.blurb or args.name,
        date=args.date, track=args.track,
        val_loss=stats.mean(loss), val_bpb=stats.mean(bpb),
        val_loss_std=stats.sample_std(loss), val_bpb_std=stats.sample_std(bpb),
        final_metric=s0["final_metric"],
        seeds=seeds, seed_results=seed_results,
        bytes_total=max(v["artifact_bytes"] for v in seed_results.values()),
        bytes_code=(runs[0].dir / "train_gpt.py").stat().st_size,
        code_sha256=s0["code_sha256"],
        val_tokens=s0["val_tokens"], val_bytes=s0["val_bytes"],
        hardware=hardware,
        pytorch_version=s0["torch_version"], cuda_version=s0["cuda_version"],
        compliance=dict(
            train_under_600s=all(v["train_time_s"] <= TIME_LIMIT for v in seed_results.values()),
            eval_under_600s=all(v["eval_time_s"] <= TIME_LIMIT for v in seed_results.values()),
            artifact_under_16mb=all(v["artifact_bytes"] <= SIZE_LIMIT for v in seed_results.values()),
            no_val_in_training=not args.val_in_training,
            # declared: train_gpt.py's TTT scores each chunk before training on it (vacuous without TTT)
            score_first_ttt=not args.ttt_not_score_first,
            code_hash_matches=True,  # load_run refuses otherwise
        ),
    )
    bpt = stats.bytes_per_token(s0["val_tokens"], s0["val_bytes"], loss[0], bpb[0])
    ref = load_reference(args, bpt, (s0["val_tokens"], s0["val_bytes"]))
    if ref is not None:
        sub.update(compute_comparison(ref, bpb, loss, bpt, args.threshold_nats))
    return sub


def make_record(args) -> Path:
    if not NAME_RE.fullmatch(args.name or ""):
        raise RecordError(f"--name {args.name!r}: use letters, digits, '.', '_', '+', '-' (no spaces)")
    if not DATE_RE.fullmatch(args.date):
        raise RecordError(f"--date {args.date!r}: expected YYYY-MM-DD")
    try:
        _dt.date.fromisoformat(args.date)
    except ValueError:
        raise RecordError(f"--date {args.date!r}: not a valid date") from None
    parent = Path(args.out) if args.out else ROOT / "records" / f"track_{args.track}"
    dest = parent / f"{args.date}_{args.name}"
    if dest.exists() and not args.force:
        raise RecordError(f"{dest} already exists (use --force to replace it)")
    if not args.run_dirs:
        raise RecordError("no run directories given")

    runs = [load_run(Path(d), args.track) for d in args.run_dirs]
    ignore = set(PER_RUN_CONFIG_KEYS) | set(args.ignore_config_key or [])
    check_runs_consistent(runs, ignore)
    sub = build_submission(runs, args)

    code_bytes = (runs[0].dir / "train_gpt.py").read_bytes()
    req_src = ROOT / "requirements.txt"
    if args.requirements:
        req = Path(args.requirements).read_text()
    elif req_src.is_file():
        req = req_src.read_text()
    else:
        req = requirements_text(code_bytes.decode("utf-8", errors="replace"), sub["pytorch_version"])
    readme = readme_text(sub, runs, args, req)

    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
    try:
        atomic_write_bytes(tmp / "train_gpt.py", code_bytes)
        for r in runs:
            shutil.copyfile(r.dir / "train.log", tmp / f"train_seed{r.seed}.log")
        atomic_write_text(tmp / "requirements.txt", req)
        atomic_write_text(tmp / "submission.json", json.dumps(sub, indent=2) + "\n")
        atomic_write_text(tmp / "README.md", readme)
        problems = check_record(tmp, folder_name=dest.name, ignore_config_keys=ignore)
        if problems:
            raise RecordError("the generated folder fails its own check:\n" + "\n".join(problems))
        os.chmod(tmp, 0o755)
        if dest.exists():  # --force
            backup = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
            os.rmdir(backup)
            os.rename(dest, backup)
            try:
                os.rename(tmp, dest)
            except OSError:
                os.rename(backup, dest)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(stats_text(sub))
    print(f"wrote {dest}")
    return dest


# ---------------------------------------------------------------------------- check
def check_record(record_dir: Path, folder_name: Optional[str] = None,
                 ignore_config_keys: Optional[set] = None) -> list[str]:
    """Re-validate a records folder. Returns a list of problems (empty = OK)."""
    d = Path(record_dir)
    problems: list[str] = []
    if not d.is_dir():
        return [f"{d}: not a directory"]
    for fn in ("README.md", "submission.json", "train_gpt.py", "requirements.txt"):
        if not (d / fn).is_file():
            problems.append(f"missing {fn}")
    if problems:
        return problems
    try:
        sub = json.loads((d / "submission.json").read_text())
    except json.JSONDecodeError as e:
        return [f"submission.json: invalid JSON ({e})"]
    if not isinstance(sub, dict):
        return ["submission.json: not an object"]
    problems += check_fields(sub, SUBMISSION_FIELDS, "submission.json")
    if problems:
        return problems
    if sub["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {sub['schema_version']} != {SCHEMA_VERSION}")
    if sub["track"] not in TRACKS:
        problems.append(f"track {sub['track']!r} not in {TRACKS}")
    if not DATE_RE.fullmatch(sub["date"]):
        problems.append(f"date {sub['date']!r} is not YYYY-MM-DD")
    name = folder_name or d.name
    if name != f"{sub['date']}_{sub['name']}":
        problems.append(f"folder name {name!r} != '<date>_<name>' = {sub['date']}_{sub['name']!r}")
    if not NAME_RE.fullmatch(sub["name"]):
        problems.append(f"name {sub['name']!r} has characters other than letters, digits, . _ + -")
    if folder_name is None and d.parent.name.startswith("track_") and d.parent.name != f"track_{sub['track']}":
        problems.append(f"folder is under {d.parent.name} but track is {sub['track']}")
    if sub["final_metric"] not in FINAL_METRICS:
        problems.append(f"final_metric {sub['final_metric']!r} not in {sorted(FINAL_METRICS)}")
    seeds = sub["seeds"]
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        return problems + ["seeds must be a non-empty list of ints"]
    if len(set(seeds)) != len(seeds):
        problems.append(f"duplicate seeds {seeds}")
    if set(sub["seed_results"]) != {str(x) for x in seeds}:
        problems.append(f"seed_results keys {sorted(sub['seed_results'])} != seeds {seeds}")
        return problems
    for x in seeds:
        r = sub["seed_results"][str(x)]
        if not isinstance(r, dict):
            problems.append(f"seed_results[{x}] is not an object")
            continue
        problems += check_fields(r, SEED_RESULT_FIELDS, f"seed_results[{x}]")
    comp = sub["compliance"]
    for k in COMPLIANCE_KEYS:
        if not isinstance(comp.get(k), bool):
            problems.append(f"compliance.{k} missing or not a bool")
    if problems:
        return problems

    # aggregates
    res = [sub["seed_results"][str(x)] for x in seeds]
    bpb = [r["val_bpb"] for r in res]
    loss = [r["val_loss"] for r in res]

    def close(a, b):
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))

    for key, vals, f in (("val_bpb", bpb, stats.mean), ("val_loss", loss, stats.mean),
                         ("val_bpb_std", bpb, stats.sample_std), ("val_loss_std", loss, stats.sample_std)):
        if not close(sub[key], f(vals)):
            problems.append(f"{key} {sub[key]} != {f.__name__} over seed_results {f(vals)}")
    if sub["bytes_total"] != max(r["artifact_bytes"] for r in res):
        problems.append(f"bytes_total {sub['bytes_total']} != max artifact_bytes {max(r['artifact_bytes'] for r in res)}")
    code = d / "train_gpt.py"
    digest = sha256_file(code)
    if digest != sub["code_sha256"]:
        problems.append(f"train_gpt.py sha256 {digest} != code_sha256 {sub['code_sha256']}")
    if code.stat().st_size != sub["bytes_code"]:
        problems.append(f"train_gpt.py is {code.stat().st_size} bytes, bytes_code says {sub['bytes_code']}")

    # limits and compliance flags
    record = sub["track"] == "10min_16mb"
    over_size = [x for x, r in zip(seeds, res) if r["artifact_bytes"] > SIZE_LIMIT]
    over_train = [x for x, r in zip(seeds, res) if r["train_time_s"] > TIME_LIMIT]
    over_eval = [x for x, r in zip(seeds, res) if r["eval_time_s"] > TIME_LIMIT]
    if over_size:
        problems.append(f"artifact over {SIZE_LIMIT:,} bytes for seeds {over_size}")
    if record and over_train:
        problems.append(f"train time over {TIME_LIMIT:.0f} s for seeds {over_train}")
    if record and over_eval:
        problems.append(f"eval time over {TIME_LIMIT:.0f} s for seeds {over_eval}")
    for key, bad in (("artifact_under_16mb", over_size), ("train_under_600s", over_train),
                     ("eval_under_600s", over_eval)):
        if comp[key] != (not bad):
            problems.append(f"compliance.{key}={comp[key]} contradicts the seed results")
    if not comp["code_hash_matches"]:
        problems.append("compliance.code_hash_matches is false")
    if record:
        for k in ("no_val_in_training", "score_first_ttt"):
            if not comp[k]:
                problems.append(f"compliance.{k} is false: not valid for the record track")

    # logs
    configs = []
    for x, r in zip(seeds, res):
        log = d / f"train_seed{x}.log"
        if not log.is_file():
            problems.append(f"missing train_seed{x}.log")
            continue
        events = parse_log(log)
        problems += compare_log_to_seed_result(events, r, log.name, digest, sub["bytes_code"],
                                               sub["final_metric"], seed=x)
        cfg = last_event(events, "config")
        if cfg is not None:
            configs.append((log.name, cfg))
        data = last_event(events, "data")
        if data is not None and sub.get("val_tokens") is not None:
            for k in ("val_tokens", "val_bytes"):
                if k in data and not log_value_matches(data[k], sub[k]):
                    problems.append(f"{log.name}: log {k} {data[k]} != {sub[k]}")
    if len(configs) > 1:
        ignore = set(PER_RUN_CONFIG_KEYS) | set(ignore_config_keys or ())
        problems += [f"logs differ: {p}" for p in config_differences(configs, ignore)]
    extra_logs = sorted(p.name for p in d.glob("train_seed*.log")
                        if p.name not in {f"train_seed{x}.log" for x in seeds})
    if extra_logs:
        problems.append(f"logs of seeds not in submission.json: {extra_logs}")

    # comparison block
    if "reference" in sub:
        problems += check_fields(sub, COMPARISON_FIELDS, "submission.json")
        ref = sub.get("reference")
        if isinstance(ref, dict) and not problems:
            try:
                bpt = stats.bytes_per_token(sub["val_tokens"], sub["val_bytes"], loss[0], bpb[0])
                again = compute_comparison(ref, bpb, loss, bpt, sub["threshold_nats"])
            except (RecordError, stats.StatsError, KeyError, TypeError) as e:
                problems.append(f"cannot recompute the comparison: {e}")
            else:
                for k in ("delta_vs_reference_bpb", "delta_vs_reference_nats", "t_statistic",
                          "welch_df", "p_value"):
                    a, b = sub.get(k), again.get(k)
                    if (a is None) != (b is None) or (a is not None and not close(a, b)):
                        problems.append(f"{k} {a} != recomputed {b}")
    else:
        stray = [k for k in COMPARISON_FIELDS if k in sub]
        if stray:
            problems.append(f"comparison fields without a reference: {stray}")
    return problems


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="*", help="run directories (one per seed, same config)")
    p.add_argument("--check", metavar="RECORD_DIR", help="re-validate an existing records folder and exit")
    p.add_argument("--name", help="short name: folder is <date>_<name> (letters, digits, . _ + -)")
    p.add_argument("--author", default="TODO")
    p.add_argument("--github-id", default="TODO")
    p.add_argument("--blurb", default="")
    p.add_argument("--date", default=_dt.date.today().isoformat(), help="YYYY-MM-DD (default today)")
    p.add_argument("--track", choices=TRACKS, default="10min_16mb")
    p.add_argument("--out", help="parent folder (default records/track_<track>)")
    p.add_argument("--force", action="store_true", help="replace an existing record folder")
    p.add_argument("--hardware", help="override the hardware string (default '<world_size>x <device>')")
    p.add_argument("--requirements", help="file to ship as requirements.txt (default: repo's, else generated)")
    p.add_argument("--method-file", help="markdown for the Method section")
    p.add_argument("--credits", help="text for the Credits section")
    p.add_argument("--ignore-config-key", action="append", default=[],
                   help=f"extra per-run config key not compared across seeds (always ignored: {', '.join(PER_RUN_CONFIG_KEYS)})")
    p.add_argument("--val-in-training", action="store_true",
                   help="declare that val data was used in training (sets no_val_in_training=false)")
    p.add_argument("--ttt-not-score-first", action="store_true",
                   help="declare that eval-time training is not score-first (sets score_first_ttt=false)")
    g = p.add_argument_group("reference for the significance test")
    g.add_argument("--ref-bpb", type=float, help="reference mean val_bpb")
    g.add_argument("--ref-bpb-std", type=float, help="reference sample std of val_bpb")
    g.add_argument("--ref-n", type=int, help="reference number of seeds")
    g.add_argument("--ref-values", type=float, nargs="+", help="reference per-seed val_bpb values")
    g.add_argument("--ref-loss-values", type=float, nargs="+", help="reference per-seed val_loss values (nats)")
    g.add_argument("--ref-record", help="reference records folder (reads its submission.json)")
    g.add_argument("--threshold-nats", type=float, default=stats.THRESHOLD_NATS,
                   help="required improvement in nats per token (default 0.005)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            if args.run_dirs:
                raise RecordError("--check takes only the record folder")
            problems = check_record(Path(args.check), ignore_config_keys=set(args.ignore_config_key))
            if problems:
                print(f"CHECK FAILED: {args.check}", file=sys.stderr)
                for pr in problems:
                    print(f"  - {pr}", file=sys.stderr)
                return 1
            print(f"CHECK OK: {args.check}")
            return 0
        if not args.name:
            raise RecordError("--name is required")
        make_record(args)
        return 0
    except (RecordError, stats.StatsError) as e:
        print(f"REFUSED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
