"""Tests for tools/sweep.py and the experiments/*.toml grids (CPU, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
GRID_FILES = sorted(EXPERIMENTS.glob("*.toml"))


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep", REPO / "tools" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sweep"] = mod
    spec.loader.exec_module(mod)
    return mod


sweep = _load_sweep()

# Env names train_gpt.py accepts: its declared options and their aliases.
ALLOWED_ENV = frozenset({f.name for f in tg.FIELDS} | set(tg.ALIASES))

EXPECTED_IDS = {
    "seed000_issue5.toml": {"2A", "2B", "2C", "2D", "7A", "7B", "4A", "4B", "4C", "5A", "5B", "5C", "6A", "6B"},
    "seed001_pr1774.toml": {"11L", "12L", "12L-SHD16", "11L-MLP4.5", "final-s42", "final-s314", "final-s999"},
    "seed002_pr487.toml": {"control", "GA", "VR", "GA+VR", "production"},
    "seed004_pr1970.toml": {"1-gates_caseops", "2-optimized_v1", "3-rope24", "4-rope32", "5-v2_baseline",
                            "6-v2_slope03", "7-v2_slope00", "8-v2_gate32", "9-v2_gate32_lzma"},
    "levers_post_deadline.toml": {"base", "awq", "asym", "eval2560", "no_qv_lr075", "qk525", "calib16", "lqer32", "no_ngram", "progctx"},
}


# --------------------------------------------------------------------------------------------------
# grid files
# --------------------------------------------------------------------------------------------------


def test_grid_files_exist():
    names = {p.name for p in GRID_FILES}
    assert {"seed000_issue5.toml", "seed001_pr1774.toml", "seed002_pr487.toml", "seed003_pr1125.toml",
            "seed004_pr1970.toml"} <= names


@pytest.mark.parametrize("path", GRID_FILES, ids=[p.name for p in GRID_FILES])
def test_grid_file_valid(path):
    grid = sweep.load_grid(path)
    assert grid.name == path.stem
    assert grid.description.strip()
    assert "train_gpt.py" in grid.command
    ids = [r.id for r in grid.rows]
    assert len(ids) == len(set(ids)) and ids
    bad = sorted(set(grid.base) - ALLOWED_ENV)
    assert not bad, f"[base] uses unknown env names {bad}"
    for r in grid.rows:
        bad = sorted(set(r.env) - ALLOWED_ENV)
        assert not bad, f"row {r.id} uses unknown env names {bad}"
        assert r.note.strip(), f"row {r.id} has no note"
    if path.name in EXPECTED_IDS:
        assert EXPECTED_IDS[path.name] <= set(ids)


def test_seed003_rows_are_cumulative():
    grid = sweep.load_grid(EXPERIMENTS / "seed003_pr1125.toml")
    ids = [r.id for r in grid.rows]
    nums = {int(i.split("-")[0]) for i in ids if i[:2].isdigit()}
    # rows 0-31 but 30 (TurboQuant: not defined by the seed), plus the 60-min rows 35 (late-start EMA), 37 (int6 QAT),
    # 38 (progressive growing), 39 (recurrence + per-loop LoRA), 40 (cosine warmdown) and 41 (XSA gating); 32 MUD is not defined
    assert nums == set(range(0, 32)) - {30} | {35, 37, 38, 39, 40, 41}
    assert grid.base["QUANT"] == "int8" and grid.base["COMPRESSOR"] == "zlib" and grid.base["INT8_CLIP_PERCENTILE"] == "99.99984"
    r31 = grid.row("31-int8clip99.5").env
    assert r31["INT8_CLIP_PERCENTILE"] == "99.5" and r31["QK_GAIN_INIT"] == "4.0" and "TIED_EMBED_LR" not in r31
    assert grid.row("41-xsa-gate").env["XSA_GATE"] == "1" and grid.row("38-grow5to11").env["GROW_LAYERS_FROM"] == "5"
    assert grid.row("39-recur4x3-lora16").env["LOOP_LORA_RANK"] == "16" and grid.row("37-int6-qat").env["QAT"] == "1"
    assert grid.row("08-swa").env["SWA_ENABLED"] == "1" and grid.row("40-cosine-warmdown").env["WARMDOWN_SHAPE"] == "cosine"
    r25 = grid.row("25-qk4").env
    assert r25["QK_GAIN_INIT"] == "4.0" and r25["MUON_WD"] == "0.06" and r25["WARMDOWN_ITERS"] == "200"
    assert r25["XSA_LAST_N"] == "9" and r25["TRAIN_SEQ_LEN"] == "2048" and r25["LOGIT_SOFTCAP"] == "20"
    assert "MLP_MULT" not in r25 and "EMA_ENABLED" not in r25  # discarded rows do not stack
    assert grid.row("15-wd100").env["WARMDOWN_ITERS"] == "100"
    assert grid.row("03-mlp3").env == {"LEAKY_SLOPE": "0.5", "XSA_LAST_N": "4", "MUON_WD": "0.02", "MLP_MULT": "3"}


def test_seed000_width_caveat():
    grid = sweep.load_grid(EXPERIMENTS / "seed000_issue5.toml")
    env = grid.row_env(grid.row("7B"))
    assert env["HEAD_DIM"] == "96" and env["MODEL_DIM"] == "576"
    assert int(env["MODEL_DIM"]) % int(env["HEAD_DIM"]) == 0
    heads = int(env["MODEL_DIM"]) // int(env["HEAD_DIM"])
    assert heads % int(env["NUM_KV_HEADS"]) == 0


@pytest.mark.parametrize("path", GRID_FILES, ids=[p.name for p in GRID_FILES])
def test_grid_shapes_consistent(path):
    """Cheap arithmetic checks on every row: heads divide width, KV heads divide heads, RoPE+SHD fit."""
    grid = sweep.load_grid(path)
    for r in grid.rows:
        env = grid.row_env(r)
        dim = int(env.get("MODEL_DIM", 512))
        head_dim = int(env.get("HEAD_DIM", 0))
        heads = dim // head_dim if head_dim else int(env.get("NUM_HEADS", 8))
        assert dim % heads == 0, r.id
        hd = dim // heads
        assert heads % int(env.get("NUM_KV_HEADS", 4)) == 0, r.id
        assert int(env.get("ROPE_DIMS", 16)) + int(env.get("SHARED_HEAD_DIM", 0)) <= hd, r.id


def test_load_grid_rejects_bad_files(tmp_path):
    def bad(text):
        p = tmp_path / "g.toml"
        p.write_text(textwrap.dedent(text))
        with pytest.raises(sweep.GridError):
            sweep.load_grid(p)

    bad("""
        [sweep]
        name = "x"
        [[row]]
        id = "a"
        [[row]]
        id = "a"
    """)
    bad("""
        [sweep]
        name = "x"
        [[row]]
        id = "a"
        env = { num_layers = 3 }
    """)
    bad("""
        [sweep]
        name = "x"
        [[row]]
        id = "a"
        env = { RUN_DIR = "elsewhere" }
    """)
    bad("""
        [sweep]
        name = "x"
        [[rows]]
        id = "a"
    """)
    bad("""
        [sweep]
        name = "x"
        baseline = "zzz"
        [[row]]
        id = "a"
    """)
    bad("""
        [sweep]
        name = "x"
        [[row]]
        id = "a/b"
    """)


# --------------------------------------------------------------------------------------------------
# dry run
# --------------------------------------------------------------------------------------------------


def test_dry_run_prints_one_env_line_per_row(capsys, tmp_path):
    rc = sweep.main([str(EXPERIMENTS / "seed000_issue5.toml"), "--dry-run", "--only", "2A,6B",
                     "--set", "PRESET=smoke", "--set", "MAX_WALLCLOCK_SECONDS=20", "--out", str(tmp_path / "o")])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 2
    grid = sweep.load_grid(EXPERIMENTS / "seed000_issue5.toml")
    for line, rid in zip(lines, ["2A", "6B"]):
        toks = shlex.split(line)
        assert toks[-2:] == ["python", "train_gpt.py"]
        pairs = [t.split("=", 1) for t in toks[:-2]]
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), "each env name appears once"
        env = dict(pairs)
        expected = grid.row_env(grid.row(rid), {"PRESET": "smoke", "MAX_WALLCLOCK_SECONDS": "20"})
        assert {k: v for k, v in env.items() if k not in ("RUN_ID", "RUN_DIR")} == expected
        assert env["RUN_DIR"].endswith(f"o/{rid}")
        assert env["RUN_ID"] == f"seed000_issue5-{rid}"
    assert "WINDOW_PATTERN=SSLL" in lines[0] and "LOGIT_SOFTCAP=0" in lines[1]
    assert "MAX_WALLCLOCK_SECONDS=20" in lines[0] and "MAX_WALLCLOCK_SECONDS=300" not in lines[0]
    assert not (tmp_path / "o").exists(), "dry run creates nothing"


def test_unknown_only_id_is_an_error(capsys):
    assert sweep.main([str(EXPERIMENTS / "seed000_issue5.toml"), "--dry-run", "--only", "nope"]) == 2


# --------------------------------------------------------------------------------------------------
# full sweep with a fake training command
# --------------------------------------------------------------------------------------------------

FAKE_TRAIN = r'''
import json, os, sys, time
env = os.environ
run_dir = env["RUN_DIR"]
if os.path.isfile(os.path.join(run_dir, "summary.json")):
    print("event:error msg:refusing_to_overwrite"); sys.exit(2)
os.makedirs(run_dir, exist_ok=True)
with open(env["COUNTER_FILE"], "a") as f:
    f.write(env["RUN_ID"] + "\n")
log = open(os.path.join(run_dir, "train.log"), "a")
def emit(line):
    print(line, flush=True); log.write(line + "\n"); log.flush()
bpb = float(env.get("FAKE_BPB", "1.2"))
emit(f"event:config NUM_LAYERS:{env.get('NUM_LAYERS', '?')} WINDOW_PATTERN:{env.get('WINDOW_PATTERN', 'L')}")
emit("event:model params:123456")
for step, ms in [(1, 900.0), (2, 500.0), (3, 120.0), (4, 100.0), (5, 101.0), (6, 99.0), (7, 100.0), (8, 102.0)]:
    emit(f"event:train step:{step} loss:{4 - step * 0.1:.3f} lr_mul:1.0 ms_step:{ms} tok_s:1000 elapsed_s:{step} remaining_s:9")
if env.get("FAKE_SLEEP"):
    time.sleep(float(env["FAKE_SLEEP"]))
if env.get("FAKE_FAIL") == "1":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("RuntimeError: CUDA out of memory (fake)", file=sys.stderr)
    emit("event:error msg:CUDA_out_of_memory_(fake)")
    sys.exit(3)
emit("event:stop step:8 train_s:0.8 reason:iterations")
emit(f"event:prequant val_loss:2.0 val_bpb:{bpb - 0.01:.5f} eval_s:0.1")
emit("event:artifact bytes_model:15000000 bytes_code:50000 bytes_total:15050000 limit:16000000 fits:1 compressor:brotli sha256:abc")
emit(f"event:roundtrip val_loss:2.01 val_bpb:{bpb:.5f} eval_s:0.1")
emit(f"event:sliding val_loss:2.0 val_bpb:{bpb - 0.02:.5f} eval_s:0.2 tokens:100 tok_s:500")
emit(f"event:final val_loss:2.0 val_bpb:{bpb - 0.02:.5f} metric:sliding eval_s:0.2")
if env.get("FAKE_NO_SUMMARY") != "1":
    summary = {"run_id": env["RUN_ID"], "seed": 1, "steps": 8, "ms_per_step": 100.5,
               "prequant_val_bpb": bpb - 0.01, "quant_val_bpb": bpb, "sliding_val_bpb": bpb - 0.02,
               "ttt_val_bpb": None, "final_val_bpb": bpb - 0.02, "final_metric": "sliding",
               "bytes_total": 15050000, "bytes_limit": 16000000, "size_ok": True}
    tmp = os.path.join(run_dir, "summary.json.tmp")
    json.dump(summary, open(tmp, "w")); os.replace(tmp, os.path.join(run_dir, "summary.json"))
    emit("event:summary path:" + os.path.join(run_dir, "summary.json"))
'''

FAKE_GRID = '''
[sweep]
name = "fake"
description = "fake grid for tests"
command = "python fake_train.py"

[base]
NUM_LAYERS = 2
FAKE_BPB = "1.2"

[[row]]
id = "a"
note = "base | with a pipe"

[[row]]
id = "b"
note = "fails"
env = { FAKE_FAIL = 1 }

[[row]]
id = "c"
note = "log only, no summary"
env = { FAKE_BPB = "1.15", FAKE_NO_SUMMARY = 1, WINDOW_PATTERN = "SL" }

[[row]]
id = "d"
note = "better"
env = { FAKE_BPB = "1.1" }
'''


@pytest.fixture
def fake_setup(tmp_path):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    grid = tmp_path / "fake.toml"
    grid.write_text(FAKE_GRID)
    counter = tmp_path / "counter.txt"
    counter.write_text("")
    out = tmp_path / "out"
    base_args = [str(grid), "--cwd", str(tmp_path), "--out", str(out), "--quiet", "--set", f"COUNTER_FILE={counter}"]
    return tmp_path, out, counter, base_args


def _runs(counter):
    return [ln for ln in counter.read_text().splitlines() if ln]


def test_full_sweep_with_fake_command(fake_setup):
    tmp_path, out, counter, args = fake_setup
    rc = sweep.main(args)
    assert rc == 1  # one row failed
    assert _runs(counter) == ["fake-a", "fake-b", "fake-c", "fake-d"]  # the sweep went on after the failure

    res = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in res["rows"]}
    assert [r["id"] for r in res["rows"]] == ["a", "b", "c", "d"]
    assert rows["a"]["status"] == "ok" and rows["a"]["source"] == "summary.json"
    assert rows["a"]["final_val_bpb"] == pytest.approx(1.18)
    assert rows["a"]["quant_val_bpb"] == pytest.approx(1.2)
    assert rows["a"]["fits"] is True and rows["a"]["bytes_total"] == 15050000
    assert rows["a"]["ms_per_step"] == pytest.approx(100.5)  # summary value wins
    assert rows["b"]["status"] == "failed" and rows["b"]["returncode"] == 3
    assert "out_of_memory" in rows["b"]["error"]
    assert rows["b"]["ms_per_step"] == pytest.approx(100.5)  # partial metrics from the log: median after warm-up
    assert rows["c"]["status"] == "ok" and rows["c"]["source"] == "log"
    assert rows["c"]["sliding_val_bpb"] == pytest.approx(1.13)
    assert rows["c"]["steps"] == 8 and rows["c"]["final_metric"] == "sliding"
    assert rows["c"]["env"] == {"FAKE_BPB": "1.15", "FAKE_NO_SUMMARY": "1", "WINDOW_PATTERN": "SL"}
    assert "WINDOW_PATTERN=SL" in rows["c"]["env_line"] and "FAKE_FAIL" not in rows["c"]["env_line"]
    assert rows["d"]["final_val_bpb"] == pytest.approx(1.08)

    md = (out / "results.md").read_text()
    assert "| id | note | env delta | pre-quant | post-quant | sliding | final | Δ vs a |" in md
    assert "| `b` |" in md and "failed (rc=3)" in md and "CUDA_out_of_memory" in md
    assert "base \\| with a pipe" in md
    d_line = next(ln for ln in md.splitlines() if ln.startswith("| `d` |"))
    assert "-0.1000" in d_line and "15,050,000" in d_line and "✓" in d_line
    assert "## Rows as env lines" in md
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (out / "_logs" / "b.log").read_text().count("RuntimeError") == 1
    # RUN_DIR of each row is <out>/<id>
    assert (out / "a" / "summary.json").is_file() and (out / "d" / "train.log").is_file()


def test_refuse_then_resume(fake_setup):
    tmp_path, out, counter, args = fake_setup
    assert sweep.main(args) == 1
    assert len(_runs(counter)) == 4

    # without --resume: refuses to touch finished rows, runs nothing
    assert sweep.main(args) == 2
    assert len(_runs(counter)) == 4

    # --resume: finished rows (a, d) are skipped; c has no summary.json and b failed, so both rerun.
    # --set FAKE_FAIL=0 makes b pass this time (overrides win over row env).
    assert sweep.main(args + ["--resume", "--set", "FAKE_FAIL=0"]) == 0
    assert _runs(counter)[4:] == ["fake-b", "fake-c"]
    assert (out / "b.attempt-1" / "train.log").is_file(), "the failed attempt is kept, not overwritten"
    assert (out / "_logs" / "b.log.attempt-1").is_file()
    res = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in res["rows"]}
    assert all(r["status"] == "ok" for r in res["rows"])
    assert rows["a"].get("resumed") is True and rows["d"].get("resumed") is True
    assert res["set"]["FAKE_FAIL"] == "0"

    # --only on one row keeps the other rows in the tables
    assert sweep.main(args + ["--resume", "--only", "a"]) == 0
    assert len(_runs(counter)) == 6
    res = json.loads((out / "results.json").read_text())
    assert [r["id"] for r in res["rows"]] == ["a", "b", "c", "d"]

    # --collect only rebuilds the reports
    (out / "results.md").unlink()
    assert sweep.main(args + ["--collect"]) == 0
    assert (out / "results.md").is_file() and len(_runs(counter)) == 6


def test_timeout_marks_row(fake_setup):
    tmp_path, out, counter, args = fake_setup
    rc = sweep.main(args + ["--only", "a", "--set", "FAKE_SLEEP=30", "--timeout", "1.5"])
    assert rc == 1
    rec = json.loads((out / "results.json").read_text())["rows"][0]
    assert rec["status"] == "timeout" and rec["wall_seconds"] < 20


def test_bad_command_is_recorded(fake_setup):
    tmp_path, out, counter, args = fake_setup
    rc = sweep.main(args + ["--only", "a", "--command", "/nonexistent/binary --x"])
    assert rc == 1
    rec = json.loads((out / "results.json").read_text())["rows"][0]
    assert rec["status"] == "failed" and rec["returncode"] == 127


# --------------------------------------------------------------------------------------------------
# library functions
# --------------------------------------------------------------------------------------------------

SAMPLE_LOG = """\
event:config NUM_LAYERS:11 MODEL_DIM:512
event:env torch:2.11 cuda:12.8 device:H100 world_size:8 code_sha256:deadbeef code_bytes:51234
event:data train_shards:80 train_tokens:8000000000 val_tokens:40546304 val_bytes:151000000
event:model params:35947451
some unrelated warning line
event:train step:1 loss:9.01 lr_mul:1.0 ms_step:15000.0 tok_s:52000 elapsed_s:15 remaining_s:580
event:train step:2 loss:8.50 lr_mul:1.0 ms_step:3000.0 tok_s:260000 elapsed_s:18 remaining_s:577
event:train step:3 loss:8.00 lr_mul:1.0 ms_step:130.0 tok_s:6000000 elapsed_s:18.2 remaining_s:577
event:train step:4 loss:7.50 lr_mul:1.0 ms_step:125.0 tok_s:6200000 elapsed_s:18.3 remaining_s:577
event:train step:5 loss:7.00 lr_mul:1.0 ms_step:124.0 tok_s:6300000 elapsed_s:18.4 remaining_s:577
event:train step:500 loss:3.10 lr_mul:1.0 ms_step:121.0 tok_s:6500000 elapsed_s:80 remaining_s:516
event:train step:1000 loss:2.90 lr_mul:1.0 ms_step:122.0 tok_s:6450000 elapsed_s:141 remaining_s:455
event:train step:1500 loss:2.80 lr_mul:0.9 ms_step:123.0 tok_s:6400000 elapsed_s:202 remaining_s:394
event:train step:2000 loss:2.75 lr_mul:0.8 ms_step:120.0 tok_s:6550000 elapsed_s:263 remaining_s:333
event:train step:2500 loss:2.70 lr_mul:0.5 ms_step:121.5 tok_s:6480000 elapsed_s:324 remaining_s:272
event:val step:4000 val_loss:2.40 val_bpb:1.0950 elapsed_s:500
[rank0]: event:stop step:4773 train_s:596.1 reason:wallclock
event:gptq hessian_s:3.9 train_plus_hessian_s:600.0 quant_s:12.0
event:prequant val_loss:2.3500 val_bpb:1.07000 eval_s:9.1
event:artifact bytes_model:15841157 bytes_code:50000 bytes_total:15891157 limit:16000000 fits:1 compressor:brotli sha256:0123abcd
event:roundtrip val_loss:2.4000 val_bpb:1.09080 eval_s:9.0
event:sliding val_loss:2.3300 val_bpb:1.07500 eval_s:95.0 tokens:40546304 tok_s:426000
event:final val_loss:2.3300 val_bpb:1.07500 metric:sliding eval_s:95.0
event:summary path:runs/x/summary.json
"""


def test_parse_log_sample(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(SAMPLE_LOG)
    m = sweep.parse_log(p)
    assert m["prequant_val_bpb"] == pytest.approx(1.07)
    assert m["quant_val_bpb"] == pytest.approx(1.0908)
    assert m["sliding_val_bpb"] == pytest.approx(1.075)
    assert m["final_val_bpb"] == pytest.approx(1.075) and m["final_metric"] == "sliding"
    assert "ttt_val_bpb" not in m
    assert m["bytes_total"] == 15891157 and m["fits"] is True and m["compressor"] == "brotli"
    assert m["steps"] == 4773 and m["stop_reason"] == "wallclock" and m["train_seconds"] == pytest.approx(596.1)
    assert m["params"] == 35947451 and m["code_bytes"] == 51234
    assert m["last_val_bpb"] == pytest.approx(1.095)
    # 10 train lines: the first 5 (compile / warm-up) are dropped, median of the rest
    assert m["ms_per_step"] == pytest.approx(121.5)
    assert m["n_train_lines"] == 10
    assert sweep.parse_log(tmp_path / "missing.log") == {}


def test_parse_log_without_stop_uses_last_train_step():
    m = sweep.parse_log_lines(["event:train step:7 ms_step:10", "event:train step:9 ms_step:12",
                               "event:error msg:nan_loss_at_step_9"])
    assert m["steps"] == 9 and m["error"] == "nan_loss_at_step_9"
    assert m["ms_per_step"] == pytest.approx(12.0)  # 2 lines: skip 1, keep at least half


def test_write_table_library_use(tmp_path):
    results = [
        {"id": "ref", "note": "", "env": {}, "status": "ok", "prequant_val_bpb": 1.2, "quant_val_bpb": 1.21},
        {"id": "x", "note": "n", "env": {"A": "1"}, "status": "ok", "prequant_val_bpb": 1.19, "quant_val_bpb": 1.205,
         "ms_per_step": 99.94, "steps": 1000, "bytes_total": 16_100_000, "fits": False},
        {"id": "y", "note": "", "env": {"B": "2"}, "status": "failed", "returncode": 1, "error": "boom"},
    ]
    text = sweep.write_table(results, tmp_path / "t.md")
    assert (tmp_path / "t.md").read_text() == text
    x_line = next(ln for ln in text.splitlines() if ln.startswith("| `x` |"))
    assert "-0.0050 (post-quant)" in x_line and "✗" in x_line and "99.9" in x_line and "16,100,000" in x_line
    assert "| `ref` |" in text and "| ref |" in text
    assert "boom" in text
    sweep.write_plot(results, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_sigterm_records_the_row_as_interrupted_and_resume_reruns_it(fake_setup):
    """SIGTERM to the sweep (a scheduler's kill): the running row is killed, recorded `interrupted`, exit 143;
    --resume skips the finished rows and runs the interrupted one again."""
    import signal
    import subprocess
    tmp_path, out, counter, args = fake_setup
    import time
    cmd = [sys.executable, str(REPO / "tools" / "sweep.py"), *args, "--only", "a,d", "--set", "FAKE_SLEEP=60"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while _runs(counter) != ["fake-a"] and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "--resume" in err
    rows = {r["id"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["a"]["status"] == "interrupted" and "SIGTERM" in rows["a"]["error"]
    assert sweep.main(args + ["--only", "a,d", "--resume"]) == 0
    assert _runs(counter) == ["fake-a", "fake-a", "fake-d"]
