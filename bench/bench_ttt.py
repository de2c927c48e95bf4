#!/usr/bin/env python3
"""TTT on one artifact: the bpb of no TTT / chunked TTT / phased TTT on the SAME weights, the phased pass's wall time
on this device, and its projection to the full challenge validation set on 8 GPUs.

Each mode starts from a fresh load of the artifact (phased TTT's global SGD changes the weights). Per mode: the score,
the targets scored (must be equal across modes), seconds; for phased also the compile warmup (random tokens, outside
the timer), the LoRA pass and each global SGD phase.

Projection (stated, not measured): the LoRA pass costs forward tokens (every chunk recomputes its window of <= 2048
tokens of its document), so its time scales with sum over documents of that cost. The local val documents are a sample
of the validation split; the full set's cost is taken as local cost x (full tokens / local tokens) and split evenly over
8 GPUs (batches go round-robin to ranks, longest first). The global SGD phases are projected from this run's SGD
tokens/s and the record's phase sizes (seed 42 of #1855: 131 + 219 + 289 chunks of 32,768 tokens) over 8 GPUs.
A second projection counts chunk steps instead (right when a step's cost is mostly fixed overhead, as in eager mode):
the full set's 50,000 document lengths are drawn from the local lengths' quantiles (scaled to the full token count),
batched longest first; steps = sum over batches of the longest document's chunks; time = steps x measured s/step / 8.

  python3 bench/bench_ttt.py ARTIFACT --data-path D --tokenizer T --out DIR [--modes none,chunked,phased] [--set K=V]
  python3 bench/bench_ttt.py ARTIFACT --data-path D --tokenizer T --out DIR --reproject DIR0/bench_ttt.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FULL_VAL_TOKENS, md_table, parse_sets, tg  # noqa: E402

RECORD_PHASE_TOKENS = (131 + 219 + 289) * 32768  # #1855 seed 42: global SGD chunks over its 3 phases
FULL_VAL_DOCS = 50_000


def batch_steps(lengths, docs_per_batch: int, chunk) -> int:
    """Chunk steps of the phased pass: per batch (longest first), the most chunks of one of its documents. `chunk`:
    the chunk size, or a function of a document's targets (TTT_CHUNK_SCHEDULE: Config.ttt_chunk_for)."""
    size = chunk if callable(chunk) else lambda n: chunk
    ls = sorted(lengths, reverse=True)
    return sum(max(-(-(n - 1) // size(n - 1)) for n in ls[k:k + docs_per_batch]) for k in range(0, len(ls), docs_per_batch))


def full_set_lengths(lengths, n_docs: int, n_tokens: float) -> list[int]:
    """n_docs lengths from the quantiles of a sample's lengths, scaled to n_tokens in all."""
    q = np.quantile(np.asarray(lengths, dtype=np.float64), (np.arange(n_docs) + 0.5) / n_docs)
    return [max(2, int(round(x))) for x in q * n_tokens / q.sum()]


class Log:
    def __init__(self):
        self.lines = []

    def __call__(self, event, **kv):
        line = f"event:{event} " + " ".join(f"{k}:{str(v).replace(' ', '')}" for k, v in kv.items())
        self.lines.append(line)
        print(line, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--data-path", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--modes", default="none,chunked,phased")
    ap.add_argument("--set", action="append", help="KEY=VAL eval-side override (TTT_*, EVAL_*, COMPILE, ...)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs of the projection")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reproject", type=Path, help="an earlier bench_ttt.json: recompute only the projection (no GPU)")
    a = ap.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64
    blob = a.artifact.read_bytes()
    over = dict(dict(TTT_ENABLED="1"), DATA_PATH=a.data_path, TOKENIZER_PATH=a.tokenizer, **parse_sets(a.set))
    log = Log()
    res = dict(artifact=str(a.artifact), device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               torch=torch.__version__, overrides=over, modes={})
    model, cfg = tg.load_artifact(blob, device, over)
    _, luts, val = tg.load_eval_data(cfg, device)
    docs = tg.ttt_documents(val, model.bos_id)
    res.update(val_tokens=len(val) - 1, val_docs=len(docs))
    use_compile = cfg.compile and device.type == "cuda"
    if a.reproject:
        res = dict(json.loads(a.reproject.read_text()), reprojected_from=str(a.reproject))
    for mode in [] if a.reproject else a.modes.split(","):
        model, cfg = tg.load_artifact(blob, device, dict(over, TTT_MODE=mode if mode != "none" else "phased"))
        t0 = time.perf_counter()
        if mode == "none":
            fwd = torch.compile(model, dynamic=False) if use_compile else model
            warm = tg.warm_compiled(fwd if use_compile else None, model, device, cfg.eval_batch_seqs, cfg.ngram_tilt_enabled)
            t0 = time.perf_counter()
            L = min(cfg.eval_seq_len, len(val) - 1)
            tilt = tg.stream_ngram_tilt(val, cfg, device) if cfg.ngram_tilt_enabled else None  # inside the timer, as in run_evals
            loss, bpb, nt, _ = tg.evaluate(fwd, model, val, L, L, cfg.eval_batch_seqs, luts, device, 0, 1, tilt)
            r = dict(val_loss=loss, val_bpb=bpb, tokens=nt, warmup_s=warm)
            if tilt is not None:
                r["ngram_tilt"] = tilt.summary("roundtrip", loss, bpb, 1)
        elif mode == "chunked":
            loss, bpb, chunks = tg.eval_ttt_chunked(model, val, cfg, luts, device, 0, 1, log)
            r = dict(val_loss=loss, val_bpb=bpb, tokens=int(sum(n for _, n in chunks)), chunks=len(chunks))
        else:
            fwd = tg.compile_ttt(model) if use_compile and cfg.ttt_compile else model
            warm = tg.warm_ttt(fwd, model, cfg, device, log)
            log("ttt_warmup", seconds=warm, compiled=fwd is not model)
            t0 = time.perf_counter()
            out = tg.eval_ttt_phased(model, val, cfg, luts, device, 0, 1, log, fwd)
            r = dict(val_loss=out["val_loss"], val_bpb=out["val_bpb"], tokens=out["tokens"], warmup_s=warm, phases=out["phases"],
                     batches=out["batches"])
            if "ngram_tilt" in out:
                r["ngram_tilt"] = out["ngram_tilt"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        r["seconds"] = time.perf_counter() - t0
        r["config"] = {k: v for k, v in cfg.to_dict().items() if k.startswith(("TTT_", "PHASED_", "GLOBAL_", "EVAL_"))}
        if device.type == "cuda":
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
        res["modes"][mode] = r
        log("bench_ttt", mode=mode, val_bpb=r["val_bpb"], tokens=r["tokens"], seconds=r["seconds"],
            **{f"ngram_{k}": v for k, v in r.get("ngram_tilt", {}).items() if k != "name"})
        del model
        torch._dynamo.reset()
    toks = {m: r["tokens"] for m, r in res["modes"].items()}
    if len(set(toks.values())) > 1:
        raise SystemExit(f"modes scored different targets: {toks}")
    if "phased" in res["modes"]:
        p = res["modes"]["phased"]
        c = tg.Config(dict(cfg.to_dict(), **{k: v for k, v in p["config"].items()}))
        cost = sum(tg.ttt_doc_cost(n, c.ttt_chunk_for(n - 1), c.ttt_eval_seq_len) for _, n in docs)
        sgd_s = sum(ph["seconds"] for ph in p["phases"])
        sgd_tok = sum(ph["tokens"] * c.global_ttt_epochs for ph in p["phases"])
        lora_s = p["seconds"] - sgd_s
        proj = dict(local_forward_tokens=cost, lora_seconds=lora_s, lora_forward_tok_s=cost / lora_s,
                    sgd_seconds=sgd_s, sgd_tok_s=sgd_tok / sgd_s if sgd_s > 0 else None, gpus=a.gpus)
        lens = [n for _, n in docs]
        steps = batch_steps(lens, c.ttt_docs_per_batch, c.ttt_chunk_for)
        proj.update(local_steps=steps, s_per_step=lora_s / steps)
        for name, full in FULL_VAL_TOKENS.items():
            lora_full = lora_s * full / res["val_tokens"] / a.gpus
            full_steps = batch_steps(full_set_lengths(lens, FULL_VAL_DOCS, full), c.ttt_docs_per_batch, c.ttt_chunk_for)
            sgd_full = RECORD_PHASE_TOKENS / proj["sgd_tok_s"] / a.gpus if proj["sgd_tok_s"] else None
            proj[name] = dict(val_tokens=full, lora_s=lora_full, sgd_s=sgd_full, total_s=lora_full + (sgd_full or 0.0),
                              steps=full_steps, lora_s_by_steps=full_steps * proj["s_per_step"] / a.gpus)
        res["projection"] = proj
    a.out.mkdir(parents=True, exist_ok=True)
    rows = [[m, f"{r['val_bpb']:.5f}", r["tokens"], f"{r['seconds']:.1f}", f"{r.get('warmup_s', 0):.1f}"] for m, r in res["modes"].items()]
    md = f"# TTT modes on {a.artifact.name} ({res['device']}, {res['val_docs']} val docs, {res['val_tokens']:,} targets)\n\n"
    md += md_table(["mode", "val_bpb", "targets", "seconds", "compile warmup s"], rows)
    if "projection" in res:
        pj = res["projection"]
        md += (f"\nphased LoRA pass: {pj['lora_seconds']:.1f} s for {pj['local_forward_tokens']:,} forward tokens "
               f"({pj['lora_forward_tok_s']:,.0f} tok/s) in {pj['local_steps']} chunk steps ({pj['s_per_step'] * 1000:.0f} ms/step); "
               f"global SGD {pj['sgd_seconds']:.1f} s\n\n")
        md += md_table(["val set", "targets", f"LoRA s / {a.gpus} GPUs (by tokens)", "chunk steps", f"LoRA s / {a.gpus} GPUs (by steps)",
                        "global SGD s", "total s (by tokens)"],
                       [[n, f"{v['val_tokens']:,}", f"{v['lora_s']:.0f}", v["steps"], f"{v['lora_s_by_steps']:.0f}",
                         "-" if v["sgd_s"] is None else f"{v['sgd_s']:.0f}", f"{v['total_s']:.0f}"]
                        for n, v in pj.items() if isinstance(v, dict)])
    print(md)
    (a.out / "bench_ttt.json").write_text(json.dumps(res, indent=1, default=str))
    (a.out / "bench_ttt.md").write_text(md)
    if log.lines:
        (a.out / "bench_ttt.log").write_text("\n".join(log.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
