"""Kernel profile of chosen training steps of ANY script that steps a torch.optim.Optimizer, without editing it:
bench/bench_vs_record.py --profile puts this folder on the run's PYTHONPATH, and Python imports `sitecustomize` at
start-up. Inert unless PROFILE_STEPS is set.

  PROFILE_STEPS=A:B[,C:D]   profile from the end of optimizer step A to the end of step B (steps counted by the
                            first optimizer that steps, from the process start: a script's warmup steps count too)
  PROFILE_OUT=DIR           where the tables go (default: the working directory)
  PROFILE_TAG=NAME          file name prefix (default: profile)

Per window: DIR/NAME_A-B.txt (torch.profiler's table, sorted by device self time) and DIR/NAME_A-B.json (per kernel:
device self time per step in ms, calls per step; the total device time per step). The profiled steps run slower
(the profiler's own overhead): time them in a separate run or drop their intervals.
"""
import os

_SPEC = os.environ.get("PROFILE_STEPS", "").strip()


def _windows(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        a, b = (int(x) for x in part.split(":"))
        if not 0 <= a < b:
            raise ValueError(f"PROFILE_STEPS={spec!r}: each window A:B needs 0 <= A < B")
        out.append((a, b))
    return out


def _install(spec: str) -> None:
    import json
    import sys

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    windows = _windows(spec)
    out_dir, tag = os.environ.get("PROFILE_OUT", "."), os.environ.get("PROFILE_TAG", "profile")
    state = dict(first=None, n=0, prof=None, win=None)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"  # a CPU run (the tests): host time instead

    def write(prof, a, b):
        steps = b - a
        rows, total = [], 0.0
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) if cuda else e.self_cpu_time_total
            if us > 0:
                rows.append(dict(name=e.key, ms_per_step=us / 1e3 / steps, calls_per_step=e.count / steps))
                total += us / 1e3 / steps
        rows.sort(key=lambda r: -r["ms_per_step"])
        os.makedirs(out_dir, exist_ok=True)
        base = os.path.join(out_dir, f"{tag}_{a}-{b}")
        with open(base + ".json", "w") as f:
            json.dump(dict(window=[a, b], steps=steps, device="cuda" if cuda else "cpu", device_ms_per_step=total,
                           kernels=rows[:300]), f, indent=1)
        with open(base + ".txt", "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=80))
        print(f"profile_hook window:{a}-{b} device_ms_per_step:{total:.2f} out:{base}.txt", file=sys.stderr, flush=True)

    def hook(opt, args, kwargs):
        if state["first"] is None:
            state["first"] = id(opt)
        if id(opt) != state["first"]:
            return
        state["n"] += 1
        n = state["n"]
        if state["prof"] is not None and n == state["win"][1]:
            sync()
            state["prof"].stop()
            write(state["prof"], *state["win"])
            state.update(prof=None, win=None)
        for a, b in windows:
            if n == a and state["prof"] is None:
                sync()
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                prof = torch.profiler.profile(activities=acts)
                prof.start()
                state.update(prof=prof, win=(a, b))

    register_optimizer_step_post_hook(hook)


if _SPEC:
    _install(_SPEC)
