"""Which attention kernel the default model uses here, whether flash-attn-4 passed its check, and whether
the model still compiles to ONE graph with it (dynamo explain, looping off and on).

Prints key:value lines:
  event:attention kernel:<fa3|fa4|fa2|sdpa|flex> fa4_check:<ok|none|reason> check_s:<s>
  event:graph looping:<0|1> graph_count:<n> graph_break_count:<n> attn_ops:<flash-attn calls in the graphs: train_gpt::fa4_*, flash_attn*>
A flash-attn-4 install that fails train_gpt.fa4_check shows its reason in fa4_check (and the kernel is sdpa).

  python3 bench/check_attention_graph.py            # GPU (needs no data)
  python3 bench/check_attention_graph.py --tiny     # CPU test
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

tg = C.tg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", metavar="KEY=VAL", help="train_gpt env override")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    cfg = tg.Config.from_env(C.knob_env(C.build_env(args.tiny, C.parse_sets(args.set))))
    device = C.pick_device()
    C.setup_runtime(device, cfg.seed, cpu_threads=1 if args.tiny else None)
    t0 = time.time()
    kernels = tg.resolve_kernels(cfg, device)
    kernel = kernels.attention
    key = device.index or 0
    verdict = "none" if key not in tg.FA4_CHECK else (tg.FA4_CHECK[key] or "ok")
    print(f"event:attention kernel:{kernel} fa4_check:{verdict.replace(' ', '_')} check_s:{time.time() - t0:.1f}", flush=True)

    model = tg.GPT(cfg, 1, kernels).to(device)
    ids = torch.randint(2, cfg.vocab_size, (2, cfg.train_seq_len), device=device)
    for looping in (False, True):
        model.looping_active = looping
        torch._dynamo.reset()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ex = torch._dynamo.explain(model)(ids, ids, model.masks(ids))
        attn_ops = sum(1 for g in ex.graphs for n in g.graph.nodes
                       if n.op == "call_function" and any(s in str(n.target) for s in ("fa4_", "flash_attn")))
        print(f"event:graph looping:{int(looping)} graph_count:{ex.graph_count} graph_break_count:{ex.graph_break_count} "
              f"attn_ops:{attn_ops}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
