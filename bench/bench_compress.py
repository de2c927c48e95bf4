"""Repack one artifact's quantized tensors with every compressor and report the bytes (and seconds) of each:
brotli / zstd / lzma (the whole PGQ1 blob) and pergroup (COMPRESSOR=pergroup: int8 weights by role, rows L1-sorted,
best codec per group; with and without lrzip when it is installed). Same tensors and meta in every case, so the
differences are the containers'. Each repack is checked to load back to identical tensors.

  python3 bench/bench_compress.py runs/<RUN_ID>/final_model.ptz [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, tg  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--out", type=Path, help="write bench_compress.{json,md} here")
    a = ap.parse_args(argv)
    blob = a.artifact.read_bytes()
    tensors, meta = tg.deserialize_state(blob)
    codecs = tg.pergroup_codecs()
    cases = [("brotli", None), ("zstd", None), ("lzma", None), ("pergroup", [c for c in codecs if c != "lrzip"])]
    if "lrzip" in codecs:
        cases.append(("pergroup", codecs))
    rows, res = [], dict(artifact=str(a.artifact), original_bytes=len(blob), cases=[])
    for comp, use in cases:
        t0 = time.perf_counter()
        packed = tg.serialize_pergroup(tensors, meta, use) if comp == "pergroup" else tg.serialize_state(tensors, meta, comp)
        pack_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        back, meta2 = tg.deserialize_state(packed)
        load_s = time.perf_counter() - t0
        same = meta2 == meta and back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
        label = comp if comp != "pergroup" else f"pergroup ({'+'.join(use)})"
        case = dict(compressor=label, bytes=len(packed), pack_s=round(pack_s, 2), load_s=round(load_s, 2), roundtrip_exact=same)
        res["cases"].append(case)
        print("event:compress " + " ".join(f"{k}:{str(v).replace(' ', '')}" for k, v in case.items()), flush=True)
        if not same:
            raise SystemExit(f"{label}: the repacked artifact does not load back to the same tensors")
    base = next(c["bytes"] for c in res["cases"] if c["compressor"] == "brotli")
    for c in res["cases"]:
        rows.append([c["compressor"], c["bytes"], c["bytes"] - base, c["pack_s"], c["load_s"]])
    md = f"# compressors on {a.artifact.name} ({len(blob):,} B as stored)\n\n" + md_table(
        ["compressor", "bytes", "vs brotli", "pack s", "load s"], rows)
    print(md)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "bench_compress.json").write_text(json.dumps(res, indent=1))
        (a.out / "bench_compress.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
