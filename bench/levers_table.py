#!/usr/bin/env python3
"""The LEVERS.md tables of bench/run_levers.sh, from what its runs left in one or more output folders.

  python3 bench/levers_table.py OUT NAME [NAME ...]             # -> stdout (run_levers writes it to OUT/LEVERS.md)
  python3 bench/levers_table.py OUT base ngram asym@p64 --extra OUT2 --extra OUT3

NAME: an eval-side variant (its results in <folder>/ttt_NAME/bench_ttt.json, looked up in OUT, then in each --extra
folder). Deltas are against the first NAME, or against REF for NAME@REF (e.g. a lever that needs other settings, such
as AsymLogit with global SGD phases, compared with those settings alone). The quantization table is OUT/quant's
bench_quant.md as bench_quant wrote it. Needs only the standard library (no torch).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HIDDEN = ("TTT_ENABLED", "DATA_PATH", "TOKENIZER_PATH")  # the same in every run: not a variant's setting


def load(folders: list[Path], name: str) -> dict | None:
    for f in folders:
        p = f / f"ttt_{name}" / "bench_ttt.json"
        if p.exists():
            return json.loads(p.read_text())
    return None


def bpb(run: dict | None, mode: str) -> float | None:
    return run["modes"].get(mode, {}).get("val_bpb") if run else None


def table(out: Path, names: list[str], extra: list[Path] = ()) -> str:
    folders = [out, *extra]
    q = out / "quant" / "bench_quant.md"
    lines = ["# Levers (bench/run_levers.sh)", "", "## Quantization, same trained weights", "",
             q.read_text().rstrip() if q.exists() else "bench_quant did not finish (see quant.out)", "",
             "## Eval side, same artifact", "",
             "| variant | settings | against | no-TTT bpb | vs ref | phased bpb | vs ref | phased s | n-gram table s |",
             "|---|---|---|---|---|---|---|---|---|"]
    first = names[0].partition("@")[0] if names else None
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.5f}"
    diff = lambda v, b: "-" if v is None or b is None else f"{v - b:+.5f}"
    for item in names:
        name, _, ref = item.partition("@")
        ref = ref or first
        run, base = load(folders, name), load(folders, ref)
        if run is None:
            lines.append(f"| {name} | | | did not finish (ttt_{name}.out) | | | | | |")
            continue
        ph = run["modes"].get("phased", {})
        ng = ph.get("ngram_tilt", {}).get("seconds")
        sets = ",".join(f"{k}={v}" for k, v in run["overrides"].items() if k not in HIDDEN)
        lines.append(f"| {name} | {sets} | {'-' if ref == name else ref} | {fmt(bpb(run, 'none'))} | "
                     f"{diff(bpb(run, 'none'), bpb(base, 'none'))} | {fmt(bpb(run, 'phased'))} | "
                     f"{diff(bpb(run, 'phased'), bpb(base, 'phased'))} | "
                     f"{'-' if 'seconds' not in ph else format(ph['seconds'], '.1f')} | {'-' if ng is None else f'{ng:.2f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--extra", type=Path, action="append", default=[], help="another run_levers OUT to look in")
    a = ap.parse_args(argv)
    sys.stdout.write(table(a.out, a.names, a.extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
