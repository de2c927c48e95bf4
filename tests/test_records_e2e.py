"""End to end with the real train_gpt.py (CPU smoke preset): 3 seeds -> records folder that
passes --check; pack_code --verify on train_gpt.py. Skipped until train_gpt.py exists."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train_gpt.py"
sys.path.insert(0, str(ROOT / "tools"))
import make_record as mr  # noqa: E402
import pack_code  # noqa: E402

pytestmark = pytest.mark.skipif(not TRAIN.exists(), reason="train_gpt.py not written yet")
SMOKE_TIMEOUT = 1200


def run_smoke(run_dir: Path, seed: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PRESET="smoke", RUN_DIR=str(run_dir), SEED=str(seed))
    return subprocess.run([sys.executable, str(TRAIN)], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=SMOKE_TIMEOUT)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e_runs")
    dirs = []
    for seed in (1, 2, 3):
        d = base / f"seed{seed}"
        r = run_smoke(d, seed)
        assert r.returncode == 0, f"smoke seed {seed} failed:\n{(r.stdout + r.stderr)[-4000:]}"
        for fn in ("summary.json", "train.log", "train_gpt.py", "final_model.ptz"):
            assert (d / fn).is_file(), f"{d}/{fn} missing"
        dirs.append(d)
    return dirs


def test_smoke_runs_make_a_valid_record(smoke_runs, tmp_path):
    out = tmp_path / "records"
    summaries = [json.loads((d / "summary.json").read_text()) for d in smoke_runs]
    ref = max(s["final_val_bpb"] for s in summaries) + 0.05
    rc = mr.main([str(d) for d in smoke_runs] + [
        "--name", "SmokeE2E", "--date", "2026-05-01", "--out", str(out), "--author", "e2e",
        "--github-id", "e2e", "--blurb", "smoke preset end-to-end",
        "--ref-bpb", f"{ref:.6f}", "--ref-bpb-std", "0.001", "--ref-n", "3",
        "--track", "non_record_16mb"])  # smoke runs score a truncated val set (VAL_MAX_TOKENS): not record-track runs
    assert rc == 0
    rec = out / "2026-05-01_SmokeE2E"
    assert mr.check_record(rec) == []
    assert mr.main(["--check", str(rec)]) == 0
    sub = json.loads((rec / "submission.json").read_text())
    assert sub["seeds"] == [1, 2, 3]
    assert (rec / "train_gpt.py").read_bytes() == (smoke_runs[0] / "train_gpt.py").read_bytes()
    assert sub["bytes_code"] == (rec / "train_gpt.py").stat().st_size
    for s, seed in zip(summaries, (1, 2, 3)):
        assert sub["seed_results"][str(seed)]["val_bpb"] == s["final_val_bpb"]
    assert sub["p_value"] is not None and sub["delta_vs_reference_bpb"] < 0


def test_pack_code_verify_on_train_gpt(tmp_path):
    packed = tmp_path / "train_gpt.py"
    info = pack_code.pack_file(TRAIN, packed)
    assert info["packed_bytes"] < info["original_bytes"]
    data = tmp_path / "smoke_data"  # private smoke data: nothing another test leaves in ROOT/data can reach either run
    cmd = f"PRESET=smoke DATA_PATH={data} TOKENIZER_PATH={data}/smoke_sp512.model {{python}} {{file}}"
    ok, report = pack_code.verify(TRAIN, packed, cmd, timeout=SMOKE_TIMEOUT)
    assert ok, "\n".join(report)
