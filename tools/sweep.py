#!/usr/bin/env python3
"""Run a grid of env-var overrides of train_gpt.py one row after another and tabulate the results.

A grid is a TOML file (see experiments/README.md):

    [sweep]
    name = "seed000_issue5"          # also the default output folder: sweeps/<name>/
    description = "..."
    command = "python train_gpt.py"  # or "torchrun --standalone --nproc_per_node=8 train_gpt.py"
    baseline = "base"                # optional: row the deltas are taken against (default: first row)
    [base]                           # env applied to every row
    WINDOW_PATTERN = "SSSL"
    [[row]]
    id = "2A"
    note = "50% global"
    env = { WINDOW_PATTERN = "SSLL" }

Each row runs with env = os.environ + [base] + row env + --set overrides + RUN_ID/RUN_DIR, where
RUN_DIR = <out>/<row id>. After each row the run's summary.json is read (else its log lines), and
<out>/results.md, results.json and results.png are rewritten.

Usage:
    python tools/sweep.py experiments/seed000_issue5.toml --dry-run
    python tools/sweep.py experiments/seed000_issue5.toml --only 2A,2C --set MAX_WALLCLOCK_SECONDS=60
    python tools/sweep.py experiments/seed000_issue5.toml --resume
    python tools/sweep.py experiments/seed000_issue5.toml --collect     # only rebuild the tables

Library use: load_grid(path), parse_log(path), write_table(results, path), write_plot(results, path),
collect_row(...). Nothing is imported from train_gpt.py; the log/summary contract is tools/contract.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contract  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMMAND = "python train_gpt.py"
SUMMARY_NAME, TRAIN_LOG_NAME = contract.SUMMARY, contract.TRAIN_LOG
CAPTURE_DIR = "_logs"  # <out>/_logs/<id>.log: stdout+stderr of each row as the sweep saw it
SKIP_TRAIN_LINES = 5  # train lines ignored (compile / warm-up) before taking the ms/step median
BPB_DECIMALS = 4

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
ENV_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
RESERVED_ENV = ("RUN_ID", "RUN_DIR")

# (record key, column title) of the val_bpb metrics, in pipeline order.
BPB_METRICS = (
    ("prequant_val_bpb", "pre-quant"),
    ("quant_val_bpb", "post-quant"),
    ("sliding_val_bpb", "sliding"),
    ("ttt_val_bpb", "ttt"),
    ("final_val_bpb", "final"),
)


class GridError(ValueError):
    """The grid file is malformed."""


class SweepError(RuntimeError):
    """The sweep cannot start (e.g. it would overwrite a finished row)."""


# --------------------------------------------------------------------------------------------------
# Grid loading
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Grid:
    name: str
    description: str = ""
    command: str = DEFAULT_COMMAND
    baseline: str | None = None
    base: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    path: Path | None = None

    def row(self, row_id: str) -> Row:
        for r in self.rows:
            if r.id == row_id:
                return r
        raise KeyError(row_id)

    def row_env(self, row: Row, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """base + row + overrides, ordered: base keys the row leaves alone, then the row's keys, then overrides."""
        overrides = dict(overrides or {})
        env: dict[str, str] = {}
        for k, v in self.base.items():
            if k not in row.env and k not in overrides:
                env[k] = v
        for k, v in row.env.items():
            if k not in overrides:
                env[k] = v
        env.update(overrides)
        return env


def env_value(value: Any, where: str = "") -> str:
    """TOML scalar or flat list -> env string (contract.env_value: bools become 1/0, lists comma-joined)."""
    try:
        return contract.env_value(value)
    except (TypeError, ValueError) as e:
        raise GridError(f"{where}: {e}") from None


def _env_table(table: Any, where: str) -> dict[str, str]:
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise GridError(f"{where}: must be a table of KEY = value")
    out: dict[str, str] = {}
    for key, value in table.items():
        if not ENV_KEY_RE.match(key):
            raise GridError(f"{where}: env name {key!r} must be UPPER_CASE")
        if key in RESERVED_ENV:
            raise GridError(f"{where}: {key} is set by the sweep itself (RUN_DIR = <out>/<row id>)")
        out[key] = env_value(value, f"{where}.{key}")
    return out


def parse_grid(data: Mapping[str, Any], path: Path | None = None) -> Grid:
    """Validate an already-parsed TOML document and build a Grid."""
    where = str(path) if path else "<grid>"
    unknown = set(data) - {"sweep", "base", "row"}
    if unknown:
        raise GridError(f"{where}: unknown top-level keys {sorted(unknown)} (expected [sweep], [base], [[row]])")
    sweep = data.get("sweep")
    if not isinstance(sweep, dict):
        raise GridError(f"{where}: missing [sweep] table")
    unknown = set(sweep) - {"name", "description", "command", "baseline"}
    if unknown:
        raise GridError(f"{where}: unknown keys in [sweep]: {sorted(unknown)}")
    name = sweep.get("name")
    if not isinstance(name, str) or not ID_RE.match(name):
        raise GridError(f"{where}: [sweep].name must be a simple name ([A-Za-z0-9._+-]), got {name!r}")
    description = sweep.get("description", "")
    command = sweep.get("command", DEFAULT_COMMAND)
    if not isinstance(description, str) or not isinstance(command, str) or not command.strip():
        raise GridError(f"{where}: [sweep].description/command must be strings (command non-empty)")
    baseline = sweep.get("baseline")
    if baseline is not None and not isinstance(baseline, str):
        raise GridError(f"{where}: [sweep].baseline must be a row id string")
    base = _env_table(data.get("base"), f"{where}: [base]")

    raw_rows = data.get("row")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise GridError(f"{where}: needs at least one [[row]]")
    rows: list[Row] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_rows):
        rw = f"{where}: row #{i + 1}"
        if not isinstance(raw, dict):
            raise GridError(f"{rw}: must be a table")
        unknown = set(raw) - {"id", "note", "env"}
        if unknown:
            raise GridError(f"{rw}: unknown keys {sorted(unknown)} (expected id, note, env)")
        rid = raw.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not ID_RE.match(rid):
            raise GridError(f"{rw}: id must match [A-Za-z0-9][A-Za-z0-9._+-]*, got {rid!r}")
        if rid in seen:
            raise GridError(f"{rw}: duplicate id {rid!r}")
        seen.add(rid)
        note = raw.get("note", "")
        if not isinstance(note, str):
            raise GridError(f"{rw}: note must be a string")
        rows.append(Row(id=rid, note=note, env=_env_table(raw.get("env"), f"{rw} ({rid}) env")))
    if baseline is not None and baseline not in seen:
        raise GridError(f"{where}: [sweep].baseline {baseline!r} is not a row id")
    return Grid(name=name, description=description, command=command, baseline=baseline, base=base,
                rows=rows, path=path)


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and validate a grid TOML file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise GridError(f"{path}: invalid TOML: {e}") from e
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file (the grids are experiments/*.toml)") from None
    except OSError as e:
        raise GridError(f"{path}: cannot read the grid file: {e.strerror or e}") from None
    return parse_grid(data, path)


# --------------------------------------------------------------------------------------------------
# Log / summary parsing
# --------------------------------------------------------------------------------------------------


def median_ms_step(values: Sequence[float], skip: int = SKIP_TRAIN_LINES) -> float | None:
    """Median of the ms/step values after the first few (compile/warm-up) lines; keeps at least half."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None
    k = min(skip, len(vals) // 2)
    return float(statistics.median(vals[k:]))


def parse_log_lines(lines: Iterable[str]) -> dict[str, Any]:
    """Normalised metrics from contract log lines (tools/contract.py). Later events win."""
    out: dict[str, Any] = {}
    ms_steps: list[float] = []
    last_train_step = None
    last_error_line = None
    for line in lines:
        ev = contract.parse_line(line, coerce_values=True)
        if ev is None:
            low = line.strip()
            if low and re.search(r"(Error|Exception|Traceback|error:|FAILED|Killed)", low):
                last_error_line = low
            continue
        name, f = ev
        if name == "train":
            if isinstance(f.get("ms_step"), (int, float)):
                ms_steps.append(float(f["ms_step"]))
            if isinstance(f.get("step"), int):
                last_train_step = f["step"]
        elif name == "val":
            if "val_bpb" in f:
                out["last_val_bpb"] = f["val_bpb"]
                out["last_val_step"] = f.get("step")
        elif name == "stop":
            if "step" in f:
                out["steps"] = f["step"]
            if "train_s" in f:
                out["train_seconds"] = f["train_s"]
            if "reason" in f:
                out["stop_reason"] = f["reason"]
        elif name in ("prequant", "roundtrip", "sliding", "ttt", "final"):
            prefix = {"prequant": "prequant", "roundtrip": "quant", "sliding": "sliding",
                      "ttt": "ttt", "final": "final"}[name]
            for k in ("val_loss", "val_bpb"):
                if k in f:
                    out[f"{prefix}_{k}"] = f[k]
            if name == "final" and "metric" in f:
                out["final_metric"] = f["metric"]
        elif name == "artifact":
            for k in ("bytes_model", "bytes_code", "bytes_total", "compressor"):
                if k in f:
                    out[k] = f[k]
            if "sha256" in f:
                out["artifact_sha256"] = f["sha256"]
            if "limit" in f:
                out["bytes_limit"] = f["limit"]
            if "fits" in f:
                out["fits"] = contract.as_bool(f["fits"])
        elif name == "gptq":
            if "hessian_s" in f:
                out["hessian_seconds"] = f["hessian_s"]
        elif name == "model":
            if "params" in f:
                out["params"] = f["params"]
        elif name == "env":
            for k in ("code_sha256", "code_bytes", "world_size", "device"):
                if k in f:
                    out[k] = f[k]
        elif name == "error":
            out["error"] = f.get("msg", line.strip())
    if ms_steps:
        out["ms_per_step"] = median_ms_step(ms_steps)
        out["n_train_lines"] = len(ms_steps)
    if "steps" not in out and last_train_step is not None:
        out["steps"] = last_train_step
    if "error" not in out and last_error_line:
        out["last_error_line"] = last_error_line
    return out


def parse_log(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a train.log (or captured stdout) into normalised metrics; {} if the file is missing."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return parse_log_lines(f)


# summary.json keys (contract.SUMMARY_FIELDS) the sweep reports, under their own names except size_ok -> fits (as in the log)
_SUMMARY_MAP = {k: "fits" if k == "size_ok" else k for k in """
    prequant_val_loss prequant_val_bpb quant_val_loss quant_val_bpb sliding_val_loss sliding_val_bpb ttt_val_loss
    ttt_val_bpb final_val_loss final_val_bpb final_metric bytes_model bytes_code bytes_total bytes_limit
    compressor artifact_sha256 ms_per_step tokens_per_s steps train_seconds hessian_seconds
    train_plus_hessian_seconds eval_seconds peak_mem_gib code_sha256 code_bytes world_size device seed run_id
    size_ok train_time_ok eval_time_ok
    """.split()}


def parse_summary(path: str | os.PathLike) -> dict[str, Any]:
    """summary.json -> the same normalised keys parse_log uses; {} if missing or unreadable."""
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {dst: data[src] for src, dst in _SUMMARY_MAP.items() if src in data and data[src] is not None}
    if "fits" not in out and isinstance(data.get("bytes_total"), int):
        out["fits"] = data["bytes_total"] <= int(data.get("bytes_limit") or contract.BYTES_LIMIT)
    return out


def collect_row(run_dir: str | os.PathLike, capture_log: str | os.PathLike | None = None) -> dict[str, Any]:
    """Metrics of one run dir: summary.json first, gaps filled from train.log, then the captured stdout."""
    run_dir = Path(run_dir)
    summary = parse_summary(run_dir / SUMMARY_NAME)
    log = parse_log(run_dir / TRAIN_LOG_NAME)
    if not log and capture_log is not None:
        log = parse_log(capture_log)
    elif capture_log is not None:
        cap = parse_log(capture_log)
        for k in ("error", "last_error_line"):
            if k in cap and k not in log:
                log[k] = cap[k]
    out = dict(log)
    out.update(summary)
    out["source"] = "summary.json" if summary else ("log" if log else "none")
    return out


def has_summary(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / SUMMARY_NAME).is_file()


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def _rows_of(results: Any) -> list[dict[str, Any]]:
    if isinstance(results, dict):
        return list(results.get("rows", []))
    return list(results)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def reference_row(rows: Sequence[Mapping[str, Any]], baseline: str | None = None) -> Mapping[str, Any] | None:
    """The row deltas are measured against: `baseline` if it has a val_bpb, else the first row with one."""
    if baseline is not None:
        for r in rows:
            if r.get("id") == baseline and any(_num(r.get(k)) is not None for k, _ in BPB_METRICS):
                return r
    for r in rows:
        if any(_num(r.get(k)) is not None for k, _ in BPB_METRICS):
            return r
    return rows[0] if rows else None


def delta_vs(row: Mapping[str, Any], ref: Mapping[str, Any] | None) -> tuple[float | None, str | None]:
    """(row - ref) on the latest pipeline metric both have (final, then ttt, sliding, post-quant, pre-quant)."""
    if ref is None:
        return None, None
    for key, title in reversed(BPB_METRICS):
        a, b = _num(row.get(key)), _num(ref.get(key))
        if a is not None and b is not None:
            return a - b, title
    return None, None


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt_bpb(v: Any) -> str:
    x = _num(v)
    return f"{x:.{BPB_DECIMALS}f}" if x is not None else "–"


def _fmt_int(v: Any) -> str:
    x = _num(v)
    return f"{int(x):,}" if x is not None else "–"


def _fmt_status(r: Mapping[str, Any]) -> str:
    st = r.get("status", "?")
    if st in ("failed", "timeout") and r.get("returncode") not in (None, 0):
        return f"{st} (rc={r.get('returncode')})"
    return str(st)


def env_delta_text(env: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items()) or "(base)"


def write_table(results: Any, path: str | os.PathLike, baseline: str | None = None, title: str | None = None,
                header_lines: Sequence[str] = ()) -> str:
    """Write the markdown results table (results: list of row records or the results.json dict)."""
    rows = _rows_of(results)
    meta = results.get("sweep", {}) if isinstance(results, dict) else {}
    if baseline is None and isinstance(results, dict):
        baseline = results.get("baseline")
    ref = reference_row(rows, baseline)
    show_ttt = any(_num(r.get("ttt_val_bpb")) is not None for r in rows)
    metrics = [(k, t) for k, t in BPB_METRICS if k != "ttt_val_bpb" or show_ttt]
    ref_id = ref.get("id") if ref else None

    lines: list[str] = []
    lines.append(f"# {title or meta.get('name') or 'Sweep results'}")
    lines.append("")
    if meta.get("description"):
        lines.append(meta["description"].strip())
        lines.append("")
    for h in header_lines:
        lines.append(h)
    if header_lines:
        lines.append("")
    cols = ["id", "note", "env delta"] + [t for _, t in metrics] + [
        f"Δ vs {ref_id}" if ref_id else "Δ", "bytes_total", "fits", "ms/step", "steps", "status"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        d, dmetric = delta_vs(r, ref)
        if r is ref:
            dtext = "ref"
        elif d is None:
            dtext = "–"
        else:
            dtext = f"{d:+.{BPB_DECIMALS}f}" + ("" if dmetric == "final" else f" ({dmetric})")
        fits = r.get("fits")
        cells = [
            f"`{_md(r.get('id'))}`",
            _md(r.get("note", "")),
            _md(env_delta_text(r.get("env") or {})),
            *[_fmt_bpb(r.get(k)) for k, _ in metrics],
            dtext,
            _fmt_int(r.get("bytes_total")),
            "✓" if fits is True else ("✗" if fits is False else "–"),
            f"{_num(r.get('ms_per_step')):.1f}" if _num(r.get("ms_per_step")) is not None else "–",
            _fmt_int(r.get("steps")),
            _md(_fmt_status(r)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Δ is the row minus the reference row on `final` val_bpb (or the latest metric both rows have, "
                 "named in brackets). Lower is better.")
    bad = [r for r in rows if r.get("status") not in ("ok",)]
    errs = [r for r in bad if r.get("error")]
    if errs:
        lines.append("")
        lines.append("## Failures")
        lines.append("")
        for r in errs:
            lines.append(f"- `{_md(r.get('id'))}` ({_md(_fmt_status(r))}): {_md(r.get('error'))}")
    env_lines = [r for r in rows if r.get("env_line")]
    if env_lines:
        lines.append("")
        lines.append("## Rows as env lines")
        lines.append("")
        lines.append("```")
        for r in env_lines:
            lines.append(r["env_line"])
        lines.append("```")
    text = "\n".join(lines) + "\n"
    contract.atomic_write_text(Path(path), text)
    return text


def write_plot(results: Any, path: str | os.PathLike, baseline: str | None = None, title: str | None = None) -> None:
    """results.png: grouped val_bpb bars per row (top) and ms/step bars (bottom). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows_of(results)
    meta = results.get("sweep", {}) if isinstance(results, dict) else {}
    ids = [str(r.get("id")) for r in rows]
    metrics = [(k, t) for k, t in BPB_METRICS if k != "final_val_bpb" and any(_num(r.get(k)) is not None for r in rows)]
    # "final" duplicates one of the others unless those are missing somewhere
    if any(_num(r.get("final_val_bpb")) is not None and
           not any(_num(r.get(k)) == _num(r.get("final_val_bpb")) for k, _ in metrics) for r in rows):
        metrics.append(("final_val_bpb", "final"))
    n = max(len(rows), 1)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(min(24.0, max(6.0, 0.45 * n * max(len(metrics), 1) ** 0.5 + 2.5)), 7.5),
                                   sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    xs = list(range(len(rows)))
    vals_all: list[float] = []
    if metrics:
        width = 0.8 / len(metrics)
        for j, (key, label) in enumerate(metrics):
            offs = [x - 0.4 + width * (j + 0.5) for x in xs]
            vals = [_num(r.get(key)) for r in rows]
            bx = [o for o, v in zip(offs, vals) if v is not None]
            bv = [v for v in vals if v is not None]
            vals_all += bv
            if bv:
                ax1.bar(bx, bv, width=width * 0.95, label=label)
        if vals_all:
            lo, hi = min(vals_all), max(vals_all)
            pad = max((hi - lo) * 0.15, 0.002)
            ax1.set_ylim(lo - pad, hi + pad)
            ref = reference_row(rows, baseline if baseline is not None else (results.get("baseline") if isinstance(results, dict) else None))
            if ref is not None:
                for key, _ in reversed(BPB_METRICS):
                    if _num(ref.get(key)) is not None:
                        ax1.axhline(_num(ref.get(key)), color="grey", lw=0.8, ls="--",
                                    label=f"ref {ref.get('id')} ({dict(BPB_METRICS)[key]})")
                        break
        ax1.legend(fontsize=8, ncol=min(len(metrics), 5))
    if not vals_all:
        ax1.text(0.5, 0.5, "no val_bpb results yet", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_ylabel("val_bpb (lower is better)")
    ax1.set_title(title or meta.get("name") or "sweep")
    ax1.grid(axis="y", alpha=0.3)
    for x, r in zip(xs, rows):
        if r.get("status") not in ("ok", None):
            ax1.annotate(str(r.get("status")), (x, 0.02), xycoords=("data", "axes fraction"), ha="center",
                         fontsize=7, color="red", rotation=90)
    ms = [_num(r.get("ms_per_step")) for r in rows]
    ax2.bar([x for x, v in zip(xs, ms) if v is not None], [v for v in ms if v is not None], color="tab:gray", width=0.6)
    if not any(v is not None for v in ms):
        ax2.text(0.5, 0.5, "no ms/step yet", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("ms/step")
    ax2.grid(axis="y", alpha=0.3)
    ax2.set_xticks(xs)
    ax2.set_xticklabels(ids, rotation=45 if len(ids) > 6 or max((len(i) for i in ids), default=0) > 8 else 0,
                        ha="right" if len(ids) > 6 else "center", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    contract.atomic_write_bytes(path, buf.getvalue())


def write_reports(results: dict[str, Any], out_dir: Path, quiet: bool = False) -> None:
    """results.json, results.md and (if matplotlib works) results.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    contract.atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    header = []
    sw = results.get("sweep", {})
    if sw.get("command"):
        header.append(f"- command: `{sw['command']}`")
    if sw.get("grid"):
        header.append(f"- grid: `{sw['grid']}`")
    if results.get("base_env_line"):
        header.append(f"- base env: `{results['base_env_line']}`")
    if results.get("set"):
        header.append(f"- --set overrides (all rows): `{env_delta_text(results['set'])}`")
    if results.get("git_commit"):
        header.append(f"- git commit: `{results['git_commit']}`")
    if results.get("updated"):
        header.append(f"- updated: {results['updated']}")
    write_table(results, out_dir / "results.md", header_lines=header)
    try:
        write_plot(results, out_dir / "results.png")
    except Exception as e:  # plotting must never lose the table
        if not quiet:
            print(f"[sweep] warning: could not write results.png: {e}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def env_line(env: Mapping[str, str], command: str) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [command])


def split_command(command: str) -> tuple[dict[str, str], list[str]]:
    """'A=1 python x.py' -> ({'A': '1'}, [sys.executable, 'x.py']). A bare python/python3 becomes this
    interpreter, so rows run in the same environment as the sweep."""
    argv = shlex.split(command)
    env: dict[str, str] = {}
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
        k, _, v = argv.pop(0).partition("=")
        env[k] = v
    if not argv:
        raise SweepError(f"empty command: {command!r}")
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return env, argv


def _display_path(p: Path, cwd: Path) -> str:
    try:
        return str(p.relative_to(cwd))
    except ValueError:
        return str(p)


def _last_error(capture: Path, metrics: Mapping[str, Any]) -> str | None:
    if metrics.get("error"):
        return str(metrics["error"])
    if metrics.get("last_error_line"):
        return str(metrics["last_error_line"])
    try:
        with open(capture, "r", encoding="utf-8", errors="replace") as f:
            tail = [ln.strip() for ln in f.readlines()[-50:] if ln.strip()]
    except OSError:
        return None
    return tail[-1] if tail else None


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def run_command(argv: Sequence[str], env: Mapping[str, str], cwd: Path, capture: Path,
                timeout: float | None = None, echo: bool = True, prefix: str = "") -> tuple[int, bool, float]:
    """Run argv (own process group) teeing stdout+stderr to capture. Returns (returncode, timed_out, seconds)."""
    capture.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(capture, "w", encoding="utf-8") as cap:
        proc = subprocess.Popen(list(argv), cwd=str(cwd), env=dict(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                encoding="utf-8", errors="replace", bufsize=1, start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                cap.write(line)
                cap.flush()
                if echo:
                    sys.stdout.write(prefix + line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            cap.write(f"\n[sweep] timeout after {timeout}s: killing process group {proc.pid}\n")
            _kill_group(proc)
        except KeyboardInterrupt:
            _kill_group(proc)
            reader.join(timeout=5)
            raise
        reader.join(timeout=30)
    return proc.returncode, timed_out, time.time() - t0


def _move_aside(path: Path) -> Path | None:
    """Rename a leftover (unfinished) run dir or file to <name>.attempt-N; never deletes anything."""
    if not path.exists():
        return None
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        return None
    n = 1
    while True:
        dest = path.with_name(f"{path.name}.attempt-{n}")
        if not dest.exists():
            path.rename(dest)
            return dest
        n += 1


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(cwd), capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(cwd),
                                   capture_output=True, text=True, timeout=10)
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def parse_set(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not ENV_KEY_RE.match(key):
            raise SweepError(f"--set expects KEY=VALUE with an UPPER_CASE key, got {item!r}")
        if key in RESERVED_ENV:
            raise SweepError(f"--set {key} is not allowed: the sweep sets RUN_ID/RUN_DIR per row (use --out)")
        out[key] = value
    return out


def parse_only(items: Sequence[str] | None, grid: Grid) -> list[Row]:
    if not items:
        return list(grid.rows)
    wanted: list[str] = []
    for item in items:
        wanted += [x.strip() for x in item.split(",") if x.strip()]
    known = {r.id for r in grid.rows}
    missing = [w for w in wanted if w not in known]
    if missing:
        raise SweepError(f"--only: unknown row id(s) {missing}; grid has {[r.id for r in grid.rows]}")
    return [r for r in grid.rows if r.id in set(wanted)]


def _row_record(grid: Grid, row: Row, out_dir: Path, cwd: Path, overrides: Mapping[str, str],
                command: str, run_id: str) -> dict[str, Any]:
    run_dir = out_dir / row.id
    env = {"RUN_ID": run_id, "RUN_DIR": _display_path(run_dir, cwd)}
    env.update(grid.row_env(row, overrides))
    return {"id": row.id, "note": row.note, "env": dict(row.env), "env_line": env_line(env, command),
            "run_dir": str(run_dir)}


METRIC_KEYS_ORDER = (
    "prequant_val_bpb", "quant_val_bpb", "sliding_val_bpb", "ttt_val_bpb", "final_val_bpb", "final_metric",
    "bytes_total", "fits", "ms_per_step", "steps",
)


def run_sweep(grid: Grid, out_dir: Path, *, only: Sequence[Row] | None = None,
              overrides: Mapping[str, str] | None = None, resume: bool = False, collect: bool = False,
              timeout: float | None = None, command: str | None = None, cwd: Path | None = None,
              echo: bool = True, log=print) -> dict[str, Any]:
    """Run (or with collect=True just gather) the selected rows; returns the results dict that was written."""
    overrides = dict(overrides or {})
    cwd = (cwd or REPO_ROOT).resolve()
    out_dir = out_dir.resolve()
    command = command or grid.command
    cmd_env, argv = split_command(command)
    selected = list(only) if only is not None else list(grid.rows)
    selected_ids = {r.id for r in selected}

    finished = [r.id for r in selected if has_summary(out_dir / r.id)]
    if finished and not resume and not collect:
        raise SweepError(
            f"rows {finished} already have {SUMMARY_NAME} in {out_dir}; refusing to overwrite finished runs. "
            "Use --resume to skip them, --only to pick other rows, or --out for a fresh folder.")

    # Keep records of rows not selected this time from an earlier results.json.
    previous: dict[str, dict[str, Any]] = {}
    prev_path = out_dir / "results.json"
    if prev_path.is_file():
        try:
            prev = json.loads(prev_path.read_text(encoding="utf-8"))
            for rec in prev.get("rows", []):
                if isinstance(rec, dict) and "id" in rec:
                    previous[str(rec["id"])] = rec
        except (OSError, ValueError):
            pass

    inherited = sorted(k for k in os.environ if k in contract.KNOWN_ENV and k not in RESERVED_ENV
                       and k not in grid.base and k not in overrides
                       and not any(k in r.env for r in selected))
    if inherited and not collect:
        log(f"[sweep] warning: these config vars come from your shell and apply to every row: "
            f"{' '.join(f'{k}={os.environ[k]}' for k in inherited)}")

    results: dict[str, Any] = {
        "sweep": {"name": grid.name, "description": grid.description, "command": command,
                  "grid": str(grid.path) if grid.path else None},
        "baseline": grid.baseline,
        "base": dict(grid.base),
        "base_env_line": " ".join(f"{k}={shlex.quote(v)}" for k, v in grid.base.items()),
        "set": overrides,
        "inherited_env": {k: os.environ[k] for k in inherited},
        "out_dir": str(out_dir),
        "cwd": str(cwd),
        "git_commit": _git_commit(cwd),
        "started": _now(),
        "updated": _now(),
        "rows": [],
    }
    records: dict[str, dict[str, Any]] = {}

    def assemble() -> None:
        rows_out = []
        for r in grid.rows:
            if r.id in records:
                rows_out.append(records[r.id])
            elif r.id in previous:
                rec = dict(previous[r.id])
                rec.setdefault("note", r.note)
                rows_out.append(rec)
            elif r.id not in selected_ids and has_summary(out_dir / r.id):
                rec = _row_record(grid, r, out_dir, cwd, overrides, command, f"{grid.name}-{r.id}")
                rec.update(collect_row(out_dir / r.id, out_dir / CAPTURE_DIR / f"{r.id}.log"))
                rec["status"] = "ok"
                rows_out.append(rec)
        results["rows"] = rows_out
        results["updated"] = _now()

    for i, row in enumerate(selected):
        run_dir = out_dir / row.id
        capture = out_dir / CAPTURE_DIR / f"{row.id}.log"
        rec = _row_record(grid, row, out_dir, cwd, overrides, command, f"{grid.name}-{row.id}")
        tag = f"[sweep {i + 1}/{len(selected)}] {row.id}"
        if has_summary(run_dir) or collect:
            metrics = collect_row(run_dir, capture)
            if has_summary(run_dir):
                rec.update(metrics)
                rec["status"] = "ok"
                rec["resumed"] = True
                log(f"{tag}: finished earlier, skipped")
            elif row.id in previous:
                records[row.id] = previous[row.id]
                continue
            elif metrics.get("source") != "none":
                rec.update(metrics)
                rec["status"] = "incomplete"
            else:
                continue
            records[row.id] = rec
            assemble()
            write_reports(results, out_dir, quiet=not echo)
            continue

        moved = [m for m in (_move_aside(run_dir), _move_aside(capture)) if m is not None]
        for m in moved:
            log(f"{tag}: moved leftover {m.name} aside (unfinished earlier attempt)")
        out_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(cmd_env)
        env.update(grid.row_env(row, overrides))
        env["RUN_ID"] = f"{grid.name}-{row.id}"
        env["RUN_DIR"] = str(run_dir)
        log(f"{tag}: {row.note}".rstrip(": "))
        log(f"{tag}: {rec['env_line']}")
        rec["started"] = _now()
        try:
            rc, timed_out, secs = run_command(argv, env, cwd, capture, timeout=timeout, echo=echo,
                                              prefix=f"[{row.id}] ")
        except KeyboardInterrupt as e:
            rec.update(collect_row(run_dir, capture))
            rec.update(status="interrupted", returncode=None,
                       error="interrupted (SIGTERM)" if isinstance(e, Terminated) else "interrupted by user (Ctrl-C)")
            records[row.id] = rec
            assemble()
            write_reports(results, out_dir, quiet=not echo)
            raise
        except OSError as e:  # e.g. command not found
            rc, timed_out, secs = 127, False, 0.0
            capture.parent.mkdir(parents=True, exist_ok=True)
            capture.write_text(f"[sweep] could not start {argv!r}: {e}\n", encoding="utf-8")
        metrics = collect_row(run_dir, capture)
        rec.update(metrics)
        rec["returncode"] = rc
        rec["wall_seconds"] = round(secs, 1)
        rec["capture_log"] = str(capture)
        if timed_out:
            rec["status"] = "timeout"
            rec["error"] = f"timed out after {timeout:g}s"
        elif rc != 0:
            rec["status"] = "failed"
            rec["error"] = _last_error(capture, metrics) or f"exit code {rc}"
        elif metrics.get("source") == "none" or not any(_num(metrics.get(k)) is not None for k, _ in BPB_METRICS):
            rec["status"] = "no-result"
            rec["error"] = "exit 0 but no summary.json and no val_bpb event in the log"
        else:
            rec["status"] = "ok"
        records[row.id] = rec
        shown = " ".join(f"{k}={rec[k]:.5g}" if isinstance(rec[k], float) else f"{k}={rec[k]}"
                         for k in METRIC_KEYS_ORDER if k in rec)
        log(f"{tag}: {rec['status']} in {secs:.0f}s {shown}" + (f" error: {rec.get('error')}" if rec.get("error") else ""))
        assemble()
        write_reports(results, out_dir, quiet=not echo)

    assemble()
    write_reports(results, out_dir, quiet=not echo)
    return results


def dry_run(grid: Grid, out_dir: Path, rows: Sequence[Row], overrides: Mapping[str, str], command: str,
            cwd: Path) -> str:
    lines = [f"# sweep {grid.name}: {len(rows)} of {len(grid.rows)} rows -> {_display_path(out_dir.resolve(), cwd.resolve())}"]
    if grid.description:
        for d in grid.description.strip().splitlines():
            lines.append(f"# {d}")
    for row in rows:
        rec = _row_record(grid, row, out_dir.resolve(), cwd.resolve(), overrides, command, f"{grid.name}-{row.id}")
        flag = "  (finished: skipped with --resume)" if has_summary(out_dir / row.id) else ""
        lines.append(f"# [{row.id}] {row.note}{flag}".rstrip())
        lines.append(rec["env_line"])
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a TOML grid of env overrides of train_gpt.py and tabulate results.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Usage:")[1])
    p.add_argument("grid", help="grid TOML file, e.g. experiments/seed000_issue5.toml")
    p.add_argument("--only", action="append", metavar="ID,ID", help="run only these row ids (repeatable)")
    p.add_argument("--set", action="append", metavar="KEY=VAL", dest="set_",
                   help="extra env for every row, wins over the grid (repeatable), e.g. --set PRESET=smoke")
    p.add_argument("--dry-run", action="store_true", help="print each row as one env line and exit")
    p.add_argument("--out", type=Path, help="output folder (default: sweeps/<name>/ in the repo root)")
    p.add_argument("--resume", action="store_true", help="skip rows whose run dir already has summary.json")
    p.add_argument("--collect", action="store_true", help="run nothing; rebuild results from existing run dirs")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="per-row wall-clock limit (kills the row)")
    p.add_argument("--command", help="override [sweep].command, e.g. 'torchrun --standalone --nproc_per_node=8 train_gpt.py'")
    p.add_argument("--cwd", type=Path, default=REPO_ROOT, help="working directory of the command (default: repo root)")
    p.add_argument("--quiet", action="store_true", help="do not echo the rows' output (it is still captured)")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the sweep is: the running row is killed and recorded as interrupted, like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    try:
        grid = load_grid(args.grid)
        overrides = parse_set(args.set_)
        rows = parse_only(args.only, grid)
        out_dir = args.out if args.out is not None else REPO_ROOT / "sweeps" / grid.name
        command = args.command or grid.command
        if args.timeout is not None and args.timeout <= 0:
            raise SweepError("--timeout must be > 0")
        if args.dry_run:
            sys.stdout.write(dry_run(grid, out_dir, rows, overrides, command, args.cwd))
            return 0
        results = run_sweep(grid, out_dir, only=rows, overrides=overrides, resume=args.resume,
                            collect=args.collect, timeout=args.timeout, command=command, cwd=args.cwd,
                            echo=not args.quiet)
    except (GridError, SweepError) as e:
        print(f"[sweep] error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        print(f"[sweep] interrupted ({how}); partial results written; --resume reruns the interrupted row", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    ran = [r for r in results["rows"] if r["id"] in {x.id for x in rows}]
    bad = [r for r in ran if r.get("status") != "ok"]
    print(f"[sweep] {len(ran) - len(bad)}/{len(ran)} rows ok; results in {out_dir / 'results.md'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
