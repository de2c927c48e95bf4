#!/usr/bin/env python3
"""Build time of the token n-gram tilt's hint tables (NGRAM_TILT_ENABLED, issue 18) on this device.

The tables are built from validation tokens, so in a real run their build counts inside the eval timer. This times
train_gpt's own builders on the local val shard, tiled --reps times to see how the time scales with tokens:
`stream_ngram_tilt` (the stream order of roundtrip / sliding / chunked TTT) and `phased_ngram_tilt` (phased TTT's
batch layout). The first pass of each size includes the device warmup; it is reported, and the projection uses the
last (largest) size. Tiling repeats documents, so the hinted fraction of the tiled streams is not a property of the
data (only the times are the point).

  python3 bench/bench_ngram.py --data-path D --tokenizer T --out DIR [--reps 1,1,4,16] [--set NGRAM_TOKEN_ORDER=16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FULL_VAL_TOKENS, Out, device_name, md_table, parse_sets, pick_device, tg  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-path", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", default="1,1,4,16", help="tilings of the val stream to time, in order")
    ap.add_argument("--set", action="append", help="KEY=VAL (NGRAM_*, TTT_DOCS_PER_BATCH, ...)")
    a = ap.parse_args(argv)
    env = dict(NGRAM_TILT_ENABLED="1", DATA_PATH=a.data_path, TOKENIZER_PATH=a.tokenizer, **parse_sets(a.set))
    cfg = tg.Config.from_env(env)
    device = pick_device()
    val = torch.from_numpy(tg.load_val_tokens(cfg.data_path, 0).astype(np.int64))
    sp, _ = tg.load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    bos = tg.bos_of(sp)
    out = Out(a.out, "bench_ngram")
    rows, res = [], dict(device=device_name(device), torch=torch.__version__,
                         order=cfg.ngram_token_order, threshold=cfg.ngram_token_threshold, runs=[])
    for rep in (int(r) for r in a.reps.split(",")):
        toks = val.repeat(rep)
        st = tg.stream_ngram_tilt(toks, cfg, device)
        docs = tg.ttt_documents(toks, bos)
        batches, _ = tg.ttt_schedule(docs, cfg, 1)
        ph = tg.phased_ngram_tilt(toks, docs, batches, cfg, device)
        for layout, t, extra in (("stream", st, {}), ("phased", ph, dict(docs=len(docs), batches=len(batches)))):
            r = dict(layout=layout, tokens=len(toks), seconds=t.seconds, s_per_m_tokens=t.seconds / len(toks) * 1e6,
                     hinted_frac=float(t.has.float().mean()), **extra)
            res["runs"].append(r)
            out("ngram_build", **r)
            rows.append([layout, f"{len(toks):,}", f"{t.seconds:.3f}", f"{r['s_per_m_tokens']:.3f}"])
    last = {r["layout"]: r for r in res["runs"]}  # the largest size of each layout (the last one timed)
    res["projection"] = {name: {lay: last[lay]["s_per_m_tokens"] * n / 1e6 for lay in last} for name, n in FULL_VAL_TOKENS.items()}
    for name, p in res["projection"].items():
        out("ngram_projection", val_set=name, stream_s=p["stream"], phased_s=p["phased"], note="one_device_builds_the_whole_table")
    out.write_json(res)
    out.write_md(md_table(["layout", "tokens", "seconds", "s per M tokens"], rows) + "\nProjected full val set (one device): " +
                 ", ".join(f"{n}: stream {p['stream']:.1f} s, phased {p['phased']:.1f} s" for n, p in res["projection"].items()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
