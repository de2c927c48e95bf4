"""MLP forward+backward microbenchmark: what a GEMM with the activation fused into it could save per step.

One MLP call of the config's shape ([N, d] -> hidden -> d, N = the tokens of one micro-batch), bf16 on
CUDA (fp32 on CPU), forward + backward with the gradients of x, W1 and W2; median of --iters calls.
Cases:
  ours        train_gpt.MLP's math, F.linear(leaky_relu(F.linear(x, W1), slope)^2, W2), torch.compile'd on
              CUDA as in the step: cuBLAS GEMMs + inductor's kernels for the activation and its derivative
              (slope = LEAKY_SLOPE of the config; the step's profile shows the same standalone kernels)
  ours_relu2  the same with slope 0 (relu^2): the activation quack can fuse
  gemms_only  the six GEMMs of fwd+bwd alone (torch.mm): the floor any activation fusion can reach
  ours_max_autotune  ours compiled with mode="max-autotune-no-cudagraphs" (inductor also tries Triton GEMM
              templates with the activation fused in); --max-autotune 0 skips it (compile takes ~1 min)
  triton_bwd_fused   train_gpt's MLP_KERNEL=triton path (MLPFusedGrad, compiled): forward as ours, the
              dgrad GEMM with the activation derivative in its epilogue (train_gpt.mlp_dgrad_op, Triton)
  triton_fused       the same plus bench/mlp_triton.py's forward: a Triton GEMM with LeakyReLU(slope)^2
              in its epilogue (autotuned). Both CUDA sm90+ only, otherwise skipped with the reason.
  quack_relu2 quack.mlp.mlp_func(..., "relu_sq") (quack-kernels, CuTe DSL, installed with flash-attn-4):
              relu^2 in the forward GEMM's epilogue, its derivative in the dgrad GEMM's epilogue.
              CUDA sm90+ only, and only when importable; otherwise skipped with the reason.
              --quack-tuned 1 (default) also times it with quack's autotuner.
Per step: calls = layer visits (looping on) x micro-batches per optimizer step on one GPU; the saving of
a case = (ours - case) x calls, in ms per step. Errors: max |out - ref| and |dx - ref| over max |ref|,
ref = the same MLP in fp32 with the case's activation.

  python3 bench/bench_mlp.py --out /tmp/mlp            # GPU
  python3 bench/bench_mlp.py --tiny --out /tmp/mlp     # CPU test
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import mlp_triton  # noqa: E402

tg = C.tg


def mlp_ref(x, w1, w2, slope):  # fp32 reference and the eager path of the compiled cases
    return F.linear(F.leaky_relu(F.linear(x, w1), slope).square(), w2)


def rel_err(a, ref) -> float:
    return float((a.detach().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def quack_mlp(device):
    """quack's fused MLP function, or the reason it cannot run here."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return None, "needs CUDA sm90+"
    try:
        from quack.mlp import mlp_func
    except Exception as e:  # noqa: BLE001 - any import failure: not usable here
        return None, f"quack not importable ({type(e).__name__}: {str(e)[:120]})"
    return (lambda tuned: lambda x, w1, w2: mlp_func(x, w1, w2, "relu_sq", tuned=tuned)), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", metavar="KEY=VAL", help="train_gpt env override")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokens", type=int, default=0, help="rows N (default: one micro-batch of the config on 1 GPU)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--quack-tuned", type=int, choices=(0, 1), default=1, help="also time quack with its autotuner")
    ap.add_argument("--max-autotune", type=int, choices=(0, 1), default=1, help="time ours_max_autotune (CUDA)")
    ap.add_argument("--compile", type=int, choices=(0, 1), default=-1, help="compile the torch cases (default: on CUDA)")
    args = ap.parse_args(argv)

    env = C.build_env(args.tiny, C.parse_sets(args.set))
    cfg = tg.Config.from_env(C.knob_env(env))
    device = C.pick_device()
    C.setup_runtime(device, cfg.seed, cpu_threads=1 if args.tiny else None)
    out = C.Out(args.out, "bench_mlp")
    out("bench_env", **C.env_info(device))
    accum = cfg.grad_accum_steps or 8
    N = args.tokens or cfg.train_batch_tokens // accum
    d, hidden = cfg.model_dim, int(cfg.mlp_mult * cfg.model_dim)
    calls = len(tg.layer_order(cfg, True)) * accum
    use_compile = (device.type == "cuda") if args.compile < 0 else bool(args.compile)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out("bench_config", tokens=N, model_dim=d, hidden=hidden, leaky_slope=cfg.leaky_slope, calls_per_step=calls,
        compile=int(use_compile), dtype=str(dtype).replace("torch.", ""), iters=args.iters)

    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(N, d, device=device, dtype=dtype, generator=g)
    w1 = (torch.randn(hidden, d, device=device, generator=g) / d ** 0.5).to(dtype)
    w2 = (torch.randn(d, hidden, device=device, generator=g) / hidden ** 0.5).to(dtype)
    gout = torch.randn(N, d, device=device, dtype=dtype, generator=g)

    def torch_case(slope, mode=None):
        fn = lambda x, a, b: mlp_ref(x, a, b, slope)  # noqa: E731
        return torch.compile(fn, dynamic=False, mode=mode) if use_compile else fn

    def gemms_only(x, a, b):  # x@W1^T, h@W2^T; g@W2, g^T@h, gh@W1, gh^T@x (h stands in for the activation)
        h = x @ a.t()
        o = h @ b.t()
        gh = gout @ b
        return o, gout.t() @ h, gh @ a, gh.t() @ x

    cases = {"ours": (torch_case(cfg.leaky_slope), cfg.leaky_slope), "ours_relu2": (torch_case(0.0), 0.0), "gemms_only": (None, None)}
    if use_compile and device.type == "cuda" and args.max_autotune:
        cases["ours_max_autotune"] = (torch_case(cfg.leaky_slope, "max-autotune-no-cudagraphs"), cfg.leaky_slope)
    fused, why = mlp_triton.load() if device.type == "cuda" else (None, "needs CUDA sm90+ (TMA)")
    if fused is not None:  # the training script's MLP_KERNEL=triton path, and that plus the fused forward
        s, dgrad = cfg.leaky_slope, tg.mlp_dgrad_op()
        fn = lambda x, a, b: tg.MLPFusedGrad.apply(x, a, b, s, dgrad, None)  # noqa: E731
        cases["triton_bwd_fused"] = (torch.compile(fn, dynamic=False) if use_compile else fn, s)
        cases["triton_fused"] = (lambda x, a, b: tg.MLPFusedGrad.apply(x, a, b, s, dgrad, fused), s)
    else:
        out("skip", case="triton_fused", reason=why.replace(" ", "_"))
    qfn, why = quack_mlp(device)
    if qfn is not None:  # untuned = quack's heuristic tile config; tuned = its autotuner (slow first call)
        cases["quack_relu2"] = (qfn(False), 0.0)
        if args.quack_tuned:
            cases["quack_relu2_tuned"] = (qfn(True), 0.0)
    else:
        out("skip", case="quack_relu2", reason=why.replace(" ", "_"))

    res = dict(tokens=N, model_dim=d, hidden=hidden, calls_per_step=calls, device=C.device_name(device), cases={})
    for name, (fn, slope) in cases.items():
        def step(_i, fn=fn):
            if fn is None:
                return gemms_only(x0, w1, w2)
            x, a, b = (t.detach().requires_grad_() for t in (x0, w1, w2))
            fn(x, a, b).backward(gout)
            return x.grad
        try:
            t0 = time.perf_counter()
            step(0)  # the first call compiles / autotunes
            C.sync(device)
            first_s = time.perf_counter() - t0
            ms = C.stats_ms(C.time_steps(step, args.iters, device, settle=args.warm))
        except Exception as e:  # noqa: BLE001 - a failing optional kernel is reported, not fatal
            out("case_failed", case=name, error=f"{type(e).__name__}:{str(e).splitlines()[0][:160]}".replace(" ", "_"))
            continue
        row = dict(ms=ms["median"], ms_mean=ms["mean"], ms_stdev=ms["stdev"], first_call_s=first_s)
        if fn is not None:  # errors vs fp32 with the case's activation
            x, a, b = (t.detach().requires_grad_() for t in (x0, w1, w2))
            o = fn(x, a, b)
            o.backward(gout)
            xr, ar, br = (t.detach().float().requires_grad_() for t in (x0, w1, w2))
            ref = mlp_ref(xr, ar, br, slope)
            ref.backward(gout.float())
            row.update(err_out=rel_err(o, ref.detach()), err_dx=rel_err(x.grad, xr.grad))
        base = res["cases"].get("ours", row)
        row["save_ms_per_step"] = (base["ms"] - row["ms"]) * calls
        res["cases"][name] = row
        out("mlp", case=name, **row)
        if name == "triton_fused":
            for (M, N, K), picked in fused.chosen_configs().items():
                out("triton_config", case=name, kernel="fwd", M=M, N=N, K=K, config=picked.replace(" ", "").replace(",", ";"))
        out.write_json(res)  # after every case: a slow optional case cut short keeps the others
        out.write_md(markdown(res))
        C.free_memory(device)
    out("done", json=out.dir / "bench_mlp.json")
    return 0


def markdown(res: dict) -> str:
    rows = [[k, r["ms"], r.get("ms_stdev"), r.get("err_out"), r.get("err_dx"), r.get("save_ms_per_step")] for k, r in res["cases"].items()]
    return (f"## bench_mlp ({res['device']})\n\nOne MLP call fwd+bwd: [{res['tokens']:,} x {res['model_dim']}] -> {res['hidden']} -> "
            f"{res['model_dim']}; {res['calls_per_step']} calls per optimizer step (looping on, one GPU).\n\n"
            + C.md_table(["case", "ms/call (median)", "stdev", "rel err out", "rel err dx", "saving ms/step vs ours"], rows))


if __name__ == "__main__":
    raise SystemExit(main())
