"""Smoke tests of bench/ on the CPU: every script runs with --tiny and prints parseable key:value lines."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "tools"))
import contract  # noqa: E402


def run(cmd: list[str], timeout: int = 120, env: dict | None = None) -> str:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p.stdout


def events(stdout: str) -> dict[str, list[dict[str, str]]]:
    """event:<name> k:v ... lines -> {name: [dict, ...]}; every token must be key:value."""
    return contract.parse_events(stdout, strict=True)


def num(v: str) -> float:
    return float(v)


def test_bench_speed_tiny(tmp_path):
    stdout = run([sys.executable, str(BENCH / "bench_speed.py"), "--tiny", "--out", str(tmp_path), "--steps", "1", "--settle", "0",
                  "--profile", "--profile-steps", "1", "--top", "5", "--set", "SEED=7"])
    ev = events(stdout)
    for name in ("bench_env", "matmul", "ours_speed", "ours_weighted", "profile", "kernel", "ref_speed", "ratio", "target", "done"):
        assert name in ev, f"missing event:{name}"
    modes = {e["mode"]: e for e in ev["ours_speed"]}
    assert set(modes) == {"off", "on"}
    assert num(modes["on"]["flops_per_token"]) > num(modes["off"]["flops_per_token"])  # looped layers count per visit
    assert num(modes["off"]["tok_s"]) > 0 and 0 < num(modes["off"]["mfu"])
    assert len(ev["kernel"]) == 5
    res = json.loads((tmp_path / "bench_speed.json").read_text())
    assert res["overrides"] == {"SEED": "7"} and res["config"]["VOCAB_SIZE"] == 512
    assert res["ratio_ours_over_ref_tok_s"]["weighted"] > 0
    w = res["ours"]["weighted"]
    assert w["tok_s"] == pytest.approx(0.35 * res["ours"]["off"]["tok_s"] + 0.65 * res["ours"]["on"]["tok_s"])
    assert "tok/s per GPU" in (tmp_path / "bench_speed.md").read_text()


def test_bench_speed_one_mode_small_ceiling_is_not_judged(tmp_path):
    """Timing one loop mode gives no time-weighted rate, and a ceiling from a too-small matmul judges no MFU."""
    stdout = run([sys.executable, str(BENCH / "bench_speed.py"), "--tiny", "--out", str(tmp_path), "--steps", "1", "--settle", "0",
                  "--modes", "on", "--ref", "0", "--matmul-n", "64"])
    ev = events(stdout)
    assert "ours_weighted" not in ev and [e["mode"] for e in ev["ours_speed"]] == ["on"]
    t = ev["target"][0]
    assert t["ceiling_ok"] == "0" and t["mfu_ok_on"] == "na" and t["tok_s_ok_on"] in ("0", "1")
    res = json.loads((tmp_path / "bench_speed.json").read_text())
    assert "weighted" not in res["ours"] and res["target"]["mfu_ok_on"] is None
    md = (tmp_path / "bench_speed.md").read_text()
    assert "not judged (the time-weighted rate needs both loop modes timed)" in md and "MFU not judged" in md and "time-weighted (" not in md


def test_bench_features_tiny(tmp_path):
    stdout = run([sys.executable, str(BENCH / "bench_features.py"), "--tiny", "--out", str(tmp_path), "--steps", "1", "--warm", "1",
                  "--attn-iters", "1", "--attn-warm", "1"])
    ev = events(stdout)
    rows = {e["row"]: e for e in ev["feature"]}
    sys.path.insert(0, str(BENCH))
    from bench_features import ROWS
    assert list(rows) == [r[0] for r in ROWS]
    assert rows["base"]["status"] == "ok" and num(rows["base"]["delta_ms"]) == 0
    assert rows["loops_off"]["status"] == "ok" and rows["loops_off"]["looping"] == "0"
    assert rows["kv_heads_8"]["status"] == "skipped"  # 4 query heads in --tiny: invalid config, reported not fatal
    assert all(r["status"] in ("ok", "skipped") for r in rows.values())
    cases = {e["case"]: e for e in ev["attn"]}
    assert cases["sdpa_causal_auto"]["status"] == "ok"
    assert {"flex_causal", "flex_w32", "flex_w16"} <= set(cases)
    assert "attn_speedup" in ev and "done" in ev
    res = json.loads((tmp_path / "bench_features.json").read_text())
    assert res["mode"] == "eager" and len(res["rows"]) == len(ROWS)
    assert "Attention microbenchmark" in (tmp_path / "bench_features.md").read_text()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout")
def test_run_gpu_benchmarks_tiny(tmp_path):
    out = tmp_path / "out"
    run(["bash", str(BENCH / "run_gpu_benchmarks.sh"), str(out), "--ref", "0", "--settle", "0"],
        env=dict(BENCH_TINY="1", SPEED_STEPS="1", FEATURE_STEPS="1", FEATURE_ARGS="--rows base,loops_off --attn 0 --warm 1"))
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["SUMMARY.md", "stdout.txt", "bench_speed.json", "bench_speed.log", "bench_speed.md",
                            "bench_features.json", "bench_features.log", "bench_features.md"])  # <= 8 files, flat
    summary = (out / "SUMMARY.md").read_text()
    assert "## bench_speed" in summary and "## bench_features" in summary
    ev = events((out / "bench_features.log").read_text())
    assert [e["row"] for e in ev["feature"]] == ["base", "loops_off"]


def test_bench_scaling_tiny_two_processes(tmp_path):
    stdout = run([sys.executable, str(BENCH / "bench_scaling.py"), "--tiny", "--out", str(tmp_path), "--nprocs", "1,2",
                  "--steps", "1", "--settle", "0", "--loss-steps", "2"], timeout=240)
    ev = events(stdout)
    runs = {(e["world"], e["mode"]) for e in ev["scaling_run"]}
    assert runs == {("1", "off"), ("1", "on"), ("2", "off"), ("2", "on")}
    sc = ev["scaling"][0]
    assert sc["nproc"] == "2" and num(sc["efficiency_weighted"]) > 0
    # same global batch (grad accumulation 8 // N) -> the same losses on 1 and 2 processes (fp32 CPU, gloo)
    eq = ev["loss_equality"][0]
    assert eq["steps"] == "2" and num(eq["max_rel_diff"]) < 1e-4
    res = json.loads((tmp_path / "bench_scaling.json").read_text())
    assert res["runs"]["1"]["accum"] == 8 and res["runs"]["2"]["accum"] == 4
    assert "time-weighted scaling efficiency" in (tmp_path / "bench_scaling.md").read_text()


def test_bench_mlp_tiny(tmp_path):
    """The MLP fusion microbenchmark: every torch case times and checks its errors, quack is skipped on the CPU
    with the reason, and the per-step saving is (ours - case) x calls per step."""
    stdout = run([sys.executable, str(BENCH / "bench_mlp.py"), "--tiny", "--out", str(tmp_path), "--iters", "2", "--warm", "1"])
    ev = events(stdout)
    cfg = ev["bench_config"][0]
    assert (cfg["tokens"], cfg["model_dim"], cfg["hidden"]) == ("256", "64", "256")  # 512 tokens / 2 micro-batches; mlp_mult 4
    assert cfg["calls_per_step"] == "8"  # 4 layer visits looping on (2 layers, loop 0..1 twice) x 2 micro-batches
    skips = {e["case"]: e["reason"] for e in ev["skip"]}  # the CUDA-only kernels say why they did not run
    assert set(skips) == {"triton_fused", "quack_relu2"} and all("CUDA" in r for r in skips.values())
    rows = {e["case"]: e for e in ev["mlp"]}
    assert set(rows) == {"ours", "ours_relu2", "gemms_only"}
    for name in ("ours", "ours_relu2"):  # fp32 on the CPU: the cases ARE the reference math
        assert num(rows[name]["err_out"]) < 1e-6 and num(rows[name]["err_dx"]) < 1e-6
    res = json.loads((tmp_path / "bench_mlp.json").read_text())
    ours = res["cases"]["ours"]["ms"]
    g = res["cases"]["gemms_only"]
    assert g["save_ms_per_step"] == pytest.approx((ours - g["ms"]) * 8)
    assert all(r["first_call_s"] >= 0 for r in res["cases"].values())
    assert "saving ms/step vs ours" in (tmp_path / "bench_mlp.md").read_text()


def test_check_attention_graph_tiny():
    """On the CPU the kernel is SDPA, no FA4 check ran, and the model is one graph in both loop modes."""
    ev = events(run([sys.executable, str(BENCH / "check_attention_graph.py"), "--tiny"]))
    assert ev["attention"][0]["kernel"] == "sdpa" and ev["attention"][0]["fa4_check"] == "none"
    graphs = {e["looping"]: e for e in ev["graph"]}
    assert set(graphs) == {"0", "1"}
    for g in graphs.values():
        assert (g["graph_count"], g["graph_break_count"], g["attn_ops"]) == ("1", "0", "0")


def test_bench_quant_tiny_baseline_is_the_main_runs_artifact(tmp_path):
    """bench_quant trains once and quantizes many ways: its first variant must be byte-identical to what train_gpt.py's
    main writes for the same env, and a variant that changes training is refused."""
    out = tmp_path / "q"
    stdout = run([sys.executable, str(BENCH / "bench_quant.py"), "--tiny", "--out", str(out), "--save-artifact",
                  "--variant", "base:", "--variant", "rtn:QUANT=rtn", "--variant", "lqer:LQER_ENABLED=1,LQER_RANK=2,GATE_QUANT_INT8=0"],
                 timeout=300)
    ev = events(stdout)
    var = {e["name"]: e for e in ev["variant"]}
    assert list(var) == ["base", "rtn", "lqer"] and num(var["base"]["d_bytes"]) == 0
    assert num(var["rtn"]["hessian_s"]) == 0 and num(var["base"]["hessian_s"]) > 0
    assert num(var["lqer"]["bytes_model"]) != num(var["base"]["bytes_model"])  # the LQER factors are stored
    res = json.loads((out / "bench_quant.json").read_text())
    assert res["variants"]["base"]["val_bpb"] == pytest.approx(num(var["base"]["val_bpb"]), abs=1e-5)
    env = dict(PRESET="smoke", ITERATIONS="8", MAX_WALLCLOCK_SECONDS="0", VAL_MAX_TOKENS="4096", GPTQ_CALIBRATION_BATCHES="2",
               TTT_ENABLED="0", SLIDING_EVAL="0", DATA_PATH=str(out / "smoke_data"), TOKENIZER_PATH=str(out / "smoke_data" / "smoke.model"),
               RUN_DIR=str(tmp_path / "main"))
    run([sys.executable, str(ROOT / "train_gpt.py")], timeout=300, env=env)
    assert (tmp_path / "main" / "final_model.ptz").read_bytes() == (out / "final_model.ptz").read_bytes()
    # bench_ttt's no-TTT mode applies the n-gram tilt as train_gpt's roundtrip eval does (same bpb as --eval-only)
    tt = [sys.executable, str(BENCH / "bench_ttt.py"), str(out / "final_model.ptz"), "--data-path", env["DATA_PATH"],
          "--tokenizer", env["TOKENIZER_PATH"], "--modes", "none", "--set", "VAL_MAX_TOKENS=4096"]
    plain = events(run(tt + ["--out", str(tmp_path / "t0"), "--set", "NGRAM_TILT_ENABLED=0"]))["bench_ttt"][0]
    tilted = events(run(tt + ["--out", str(tmp_path / "t1"), "--set", "NGRAM_TILT_ENABLED=1"]))["bench_ttt"][0]
    assert "ngram_tilted" not in plain and num(tilted["ngram_tilted"]) > 0
    assert num(plain["val_bpb"]) == pytest.approx(num(var["base"]["val_bpb"]), abs=1e-6)
    ev = dict(env, RUN_DIR=str(tmp_path / "ev"), NGRAM_TILT_ENABLED="1")
    rt = events(run([sys.executable, str(ROOT / "train_gpt.py"), "--eval-only", str(out / "final_model.ptz")], timeout=300, env=ev))["roundtrip"][0]
    assert num(tilted["val_bpb"]) == pytest.approx(num(rt["val_bpb"]), abs=1e-6) and num(tilted["val_bpb"]) != num(plain["val_bpb"])
    p = subprocess.run([sys.executable, str(BENCH / "bench_quant.py"), "--tiny", "--out", str(tmp_path / "bad"), "--variant", "x:SEED=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "SEED changes training" in p.stderr


def test_bench_ngram_tiny(tmp_path):
    """bench_ngram times train_gpt's own table builders on the val stream and projects the full val set from the largest size."""
    import train_gpt as tg  # conftest puts the repo root on sys.path
    d = tmp_path / "smoke"
    tg.build_smoke_dataset(str(d), str(d / "smoke.model"), 512, lambda m: None)
    stdout = run([sys.executable, str(BENCH / "bench_ngram.py"), "--data-path", str(d), "--tokenizer", str(d / "smoke.model"),
                  "--out", str(tmp_path / "b"), "--reps", "1,2", "--set", "VOCAB_SIZE=512"])
    ev = events(stdout)
    builds = ev["ngram_build"]
    assert [(b["layout"], b["tokens"]) for b in builds][::2] == [("stream", builds[0]["tokens"]), ("stream", str(2 * int(builds[0]["tokens"])))]
    assert all(num(b["seconds"]) > 0 and 0 < num(b["hinted_frac"]) <= 1 for b in builds)
    res = json.loads((tmp_path / "b" / "bench_ngram.json").read_text())
    last = res["runs"][-1]
    assert last["layout"] == "phased" and res["projection"]["sp8192"]["phased"] == pytest.approx(last["s_per_m_tokens"] * 40.54)


def test_levers_table_reference_rows_and_extra_folders(tmp_path):
    """bench/levers_table.py: deltas against the first row, or against REF for NAME@REF; results found in --extra folders;
    a variant with no results is listed as not finished."""
    def put(folder, name, none, phased, **over):
        d = folder / f"ttt_{name}"
        d.mkdir(parents=True)
        modes = dict(none=dict(val_bpb=none), phased=dict(val_bpb=phased, seconds=12.5))
        (d / "bench_ttt.json").write_text(json.dumps(dict(overrides=dict(TTT_ENABLED="1", **over), modes=modes)))
    a, b = tmp_path / "a", tmp_path / "b"
    put(a, "base", 3.0, 2.5)
    put(a, "ph", 3.0, 2.4, PHASED_TTT_PREFIX_DOCS="64")
    put(b, "asym", 3.0, 2.39, PHASED_TTT_PREFIX_DOCS="64", ASYM_LOGIT_RESCALE="1")
    p = subprocess.run([sys.executable, str(BENCH / "levers_table.py"), str(a), "base", "ph", "asym@ph", "gone", "--extra", str(b)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in p.stdout.splitlines() if r.startswith("| ") and "---" not in r}
    assert rows["ph"][2:7] == ["base", "3.00000", "+0.00000", "2.40000", "-0.10000"]
    assert rows["asym"][1] == "PHASED_TTT_PREFIX_DOCS=64,ASYM_LOGIT_RESCALE=1" and rows["asym"][2] == "ph" and rows["asym"][6] == "-0.01000"
    assert "did not finish" in rows["gone"][3] and "bench_quant did not finish" in p.stdout


def test_run_levers_tiny(tmp_path):
    """bench/run_levers.sh: bench_quant, then bench_ttt per eval lever on its artifact, one LEVERS.md; a setting whose
    value holds commas (TTT_CHUNK_SCHEDULE) reaches bench_ttt whole."""
    out = tmp_path / "lv"
    stdout = run(["bash", str(BENCH / "run_levers.sh"), str(out)], timeout=900,
                 env=dict(LEVERS_TINY="1", QUANT_VARIANTS="base: rtn:QUANT=rtn", TTT_VARIANTS="base: chunks@base:TTT_CHUNK_SCHEDULE=64:8,200:16"))
    assert "bench_quant rc=0" in stdout and "bench_ttt base rc=0" in stdout and "bench_ttt chunks rc=0" in stdout
    md = (out / "LEVERS.md").read_text()
    assert "| rtn | QUANT=rtn |" in md and "| chunks | TTT_CHUNK_SCHEDULE=64:8,200:16 | base |" in md and "did not finish" not in md
    ph = json.loads((out / "ttt_chunks" / "bench_ttt.json").read_text())["modes"]["phased"]
    assert ph["config"]["TTT_CHUNK_SCHEDULE"] == "64:8,200:16"
