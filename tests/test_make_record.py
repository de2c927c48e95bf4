"""tools/make_record.py + tools/record_stats.py with synthetic run dirs that follow
docs/FORMATS.md (summary.json, train.log, train_gpt.py). CPU, fast."""
from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_record as mr  # noqa: E402
import record_stats as rs  # noqa: E402

LN2 = math.log(2)
CODE = b'"""fake train_gpt.py for tests"""\nprint("hello")\n'
VAL_TOKENS, VAL_BYTES = 40_000_000, 151_000_000
DATE = "2026-05-01"


# ------------------------------------------------------------------ synthetic run dirs
def make_run(base: Path, seed: int, *, code: bytes = CODE, config: dict | None = None,
             log_override: dict | None = None, drop: tuple = (), **over) -> Path:
    """A run dir as train_gpt.py writes it; `over` replaces summary fields (log follows)."""
    d = base / f"run_seed{seed}"
    d.mkdir(parents=True)
    (d / "train_gpt.py").write_bytes(code)
    sha = hashlib.sha256(code).hexdigest()
    final_bpb = 1.0600 + 0.00037 * seed + 1.234e-7  # not round: logs print 6 decimals
    bpt = VAL_BYTES / VAL_TOKENS

    def loss(bpb):
        return bpb * LN2 * bpt

    cfg = {"PRESET": "", "RUN_ID": f"r{seed}", "RUN_DIR": str(d), "SEED": seed, "MODEL_DIM": 512,
           "NUM_LAYERS": 11, "TTT_ENABLED": False, "MATRIX_LR": 0.026, "DATA_PATH": "./data/x"}
    cfg.update(config or {})
    bytes_code = len(code)
    bytes_model = 15_800_000 + seed
    s = {
        "run_id": f"r{seed}", "seed": seed, "code_sha256": sha, "code_bytes": bytes_code,
        "config": cfg, "world_size": 8, "device": "NVIDIA H100 80GB HBM3",
        "torch_version": "2.11.0+cu130", "cuda_version": "13.0",
        "steps": 4500 + seed, "train_seconds": 590.123, "hessian_seconds": 4.5,
        "train_plus_hessian_seconds": 594.623, "max_wallclock_seconds": 600.0,
        "ms_per_step": 131.1234, "tokens_per_s": 6.0e6, "peak_mem_gib": 40.0,
        "val_tokens": VAL_TOKENS, "val_bytes": VAL_BYTES,
        "prequant_val_loss": loss(final_bpb - 0.01), "prequant_val_bpb": final_bpb - 0.01,
        "quant_val_loss": loss(final_bpb + 0.02), "quant_val_bpb": final_bpb + 0.02,
        "sliding_val_loss": loss(final_bpb), "sliding_val_bpb": final_bpb,
        "ttt_val_loss": None, "ttt_val_bpb": None,
        "final_val_loss": loss(final_bpb), "final_val_bpb": final_bpb, "final_metric": "sliding",
        "eval_seconds": 123.4, "max_eval_seconds": 600.0,
        "bytes_model": bytes_model, "bytes_code": bytes_code, "bytes_total": bytes_model + bytes_code,
        "bytes_limit": 16_000_000, "artifact_sha256": "0" * 64, "compressor": "brotli",
        "train_time_ok": True, "eval_time_ok": True, "size_ok": True,
    }
    s.update(over)
    if "bytes_model" in over and "bytes_total" not in over:
        s["bytes_total"] = s["bytes_model"] + s["bytes_code"]
    lg = dict(s, **(log_override or {}))
    c = lg["config"]
    lines = [
        "event:config " + " ".join(f"{k}:{v}" for k, v in c.items()),
        f"event:env torch:{lg['torch_version']} cuda:{lg['cuda_version']} device:H100 world_size:8 "
        f"code_sha256:{lg['code_sha256']} code_bytes:{lg['code_bytes']}" + "".join(f" {k}:{lg[k]}" for k in ("attention", "mlp_kernel") if k in lg),
        f"event:data train_shards:80 train_tokens:8000000000 val_tokens:{lg['val_tokens']} val_bytes:{lg['val_bytes']}",
        "event:model params:35000000",
        "event:train step:100 loss:3.1 lr_mul:1.0 ms_step:131.0 tok_s:6000000 elapsed_s:13.1 remaining_s:580",
        f"event:stop step:{lg['steps']} train_s:{lg['train_seconds']:.3f} reason:wallclock",
        f"event:gptq hessian_s:{lg['hessian_seconds']:.3f} train_plus_hessian_s:{lg['train_plus_hessian_seconds']:.3f} quant_s:20.0",
        f"event:prequant val_loss:{lg['prequant_val_loss']:.6f} val_bpb:{lg['prequant_val_bpb']:.6f} eval_s:10.0",
        f"event:artifact bytes_model:{lg['bytes_model']} bytes_code:{lg['bytes_code']} bytes_total:{lg['bytes_total']} "
        f"limit:16000000 fits:1 compressor:brotli sha256:{'0' * 64}",
        f"event:roundtrip val_loss:{lg['quant_val_loss']:.6f} val_bpb:{lg['quant_val_bpb']:.6f} eval_s:10.0",
    ]
    if lg["sliding_val_bpb"] is not None:
        lines.append(f"event:sliding val_loss:{lg['sliding_val_loss']:.6f} val_bpb:{lg['sliding_val_bpb']:.6f} "
                     f"eval_s:100.0 tokens:{VAL_TOKENS} tok_s:400000")
    if lg["ttt_val_bpb"] is not None:
        lines.append(f"event:ttt val_loss:{lg['ttt_val_loss']:.6f} val_bpb:{lg['ttt_val_bpb']:.6f} eval_s:300.0")
    lines += [
        f"event:final val_loss:{lg['final_val_loss']:.6f} val_bpb:{lg['final_val_bpb']:.6f} "
        f"metric:{lg['final_metric']} eval_s:{lg['eval_seconds']:.1f}",
        f"event:summary path:{d}/summary.json",
    ]
    (d / "train.log").write_text("some non-event line\n" + "\n".join(lines) + "\n")
    for k in drop:
        s.pop(k)
    (d / "summary.json").write_text(json.dumps(s, indent=1))
    (d / "final_model.ptz").write_bytes(b"\0" * 16)
    return d


def build(tmp_path: Path, run_dirs, *extra: str, name: str = "MyIdea") -> tuple[int, Path]:
    out = tmp_path / "records"
    argv = [str(d) for d in run_dirs] + ["--name", name, "--date", DATE, "--out", str(out),
                                           "--author", "Tester", "--github-id", "tester",
                                           "--blurb", "test record", *extra]
    return mr.main(argv), out / f"{DATE}_{name}"


def assert_nothing_written(tmp_path: Path):
    out = tmp_path / "records"
    assert not out.exists() or list(out.iterdir()) == []


@pytest.fixture
def three_runs(tmp_path):
    return [make_run(tmp_path / "runs", s) for s in (1, 2, 3)]


# ------------------------------------------------------------------ happy path
def test_three_seeds_make_a_record_that_passes_check(tmp_path, three_runs, capsys):
    rc, rec = build(tmp_path, three_runs)
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in rec.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", "train_gpt.py",
                     "train_seed1.log", "train_seed2.log", "train_seed3.log"]
    assert (rec / "train_gpt.py").read_bytes() == CODE
    for s, d in zip((1, 2, 3), three_runs):
        assert (rec / f"train_seed{s}.log").read_bytes() == (d / "train.log").read_bytes()
    sub = json.loads((rec / "submission.json").read_text())
    assert mr.check_record(rec) == []
    assert mr.main(["--check", str(rec)]) == 0
    # schema
    for k in ("author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb",
              "val_loss_std", "val_bpb_std", "seeds", "seed_results", "bytes_total", "bytes_code",
              "hardware", "pytorch_version", "cuda_version", "compliance"):
        assert k in sub
    assert sub["seeds"] == [1, 2, 3] and sub["track"] == "10min_16mb" and sub["date"] == DATE
    bpbs = [json.loads((d / "summary.json").read_text())["final_val_bpb"] for d in three_runs]
    assert sub["val_bpb"] == pytest.approx(sum(bpbs) / 3, abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(0.00037, rel=1e-6)  # seeds 1,2,3 step 0.00037
    assert sub["bytes_total"] == 15_800_003 + len(CODE)
    assert sub["bytes_code"] == len(CODE)
    r1 = sub["seed_results"]["1"]
    assert set(r1) >= {"val_loss", "val_bpb", "prequant_val_bpb", "quant_val_bpb", "sliding_val_bpb",
                       "artifact_bytes", "steps", "step_avg_ms", "train_time_s", "eval_time_s"}
    assert r1["train_time_s"] == 594.623 and r1["steps"] == 4501
    assert all(sub["compliance"][k] is True for k in mr.COMPLIANCE_KEYS)
    assert sub["hardware"] == "8x NVIDIA H100 80GB HBM3"
    assert "reference" not in sub and "p_value" not in sub
    readme = (rec / "README.md").read_text()
    for sec in ("## Results", "## Method", "## Compliance", "## Requirements", "## Reproduce", "## Credits",
                "C1", "C2", "C3", "C4", "torchrun --standalone --nproc_per_node=8 train_gpt.py",
                "MODEL_DIM=512", "MATRIX_LR=0.026"):
        assert sec in readme, sec
    assert "RUN_DIR=" not in readme and "RUN_ID=" not in readme  # per-run keys not in the env line
    assert "full softmax over the whole vocabulary." in readme and "n-gram tilt" not in readme  # NGRAM_TILT_ENABLED unset
    assert "| 2 | 4502 |" in readme
    # no temp folders left next to the record
    assert [p.name for p in rec.parent.iterdir()] == [rec.name]


def test_readme_discloses_the_ngram_tilt(tmp_path, capsys):
    """A run with NGRAM_TILT_ENABLED=1 (the default since 2026-12-04): the README's C2 line says the score is the tilted,
    normalized distribution, where its hints come from and that its table is built inside the eval timer."""
    runs = [make_run(tmp_path / "runs", s, config={"NGRAM_TILT_ENABLED": True}) for s in (1, 2, 3)]
    rc, rec = build(tmp_path, runs)
    assert rc == 0, capsys.readouterr().err
    c2 = next(l for l in (rec / "README.md").read_text().splitlines() if l.startswith("- **C2"))
    assert "NGRAM_TILT_ENABLED=1" in c2 and "sums to 1" in c2 and "already scored" in c2 and "inside the eval timer" in c2
    assert mr.check_record(rec) == []


def test_default_out_is_records_track_folder(tmp_path, three_runs, monkeypatch):
    monkeypatch.setattr(mr, "ROOT", tmp_path)
    rc = mr.main([str(d) for d in three_runs] + ["--name", "X", "--date", DATE, "--track", "non_record_16mb"])
    assert rc == 0
    rec = tmp_path / "records" / "track_non_record_16mb" / f"{DATE}_X"
    assert mr.check_record(rec) == []
    assert json.loads((rec / "submission.json").read_text())["track"] == "non_record_16mb"


def test_ttt_final_metric_and_requirements(tmp_path, monkeypatch):
    monkeypatch.setattr(mr, "ROOT", tmp_path)  # no repo requirements.txt -> generated pinned list
    runs = []
    for s in (1, 2):
        bpb = 1.05 + 0.001 * s
        lo = bpb * LN2 * VAL_BYTES / VAL_TOKENS
        runs.append(make_run(tmp_path / "runs", s, final_metric="ttt", ttt_val_bpb=bpb, ttt_val_loss=lo,
                             final_val_bpb=bpb, final_val_loss=lo,
                             code=b"import numpy as np\nimport torch\nimport os\nprint(1)\n"))
    rc, rec = build(tmp_path, runs)
    assert rc == 0
    sub = json.loads((rec / "submission.json").read_text())
    assert sub["final_metric"] == "ttt" and sub["seed_results"]["1"]["ttt_val_bpb"] == pytest.approx(1.051)
    req = (rec / "requirements.txt").read_text()
    assert "torch==2.11.0" in req and "numpy" in req and "\nos" not in req
    assert "TTT BPB" in (rec / "README.md").read_text()


def test_repo_requirements_are_copied(tmp_path, three_runs, monkeypatch):
    (tmp_path / "requirements.txt").write_text("torch>=2.5\nnumpy\n")
    monkeypatch.setattr(mr, "ROOT", tmp_path)
    rc, rec = build(tmp_path, three_runs)
    assert rc == 0 and (rec / "requirements.txt").read_text() == "torch>=2.5\nnumpy\n"


def test_readme_names_the_attention_kernel_of_the_runs(tmp_path, three_runs):
    """Step time depends on the (optional) attention kernel: the README says which one the logs name."""
    rc, rec = build(tmp_path, three_runs)  # logs without attention: (older runs) nothing is claimed
    assert rc == 0 and "Attention kernel" not in (rec / "README.md").read_text()
    runs = [make_run(tmp_path / "fa4", s, log_override={"attention": "fa4", "mlp_kernel": "triton"}) for s in (1, 2)]
    rc, rec = build(tmp_path, runs, name="WithFA4")
    readme = (rec / "README.md").read_text()
    assert rc == 0 and "Attention kernel in these runs (`event:env attention:`): `fa4`." in readme
    assert "MLP backward kernel (`event:env mlp_kernel:`): `triton`." in readme
    assert 'pip install "flash-attn-4[cu13]"' in readme and mr.check_record(rec) == []


def test_force_replaces_existing_record(tmp_path, three_runs):
    rc, rec = build(tmp_path, three_runs)
    assert rc == 0
    (rec / "marker").write_text("old")
    rc2, _ = build(tmp_path, three_runs)
    assert rc2 == 1 and (rec / "marker").exists()  # refused, untouched
    rc3, _ = build(tmp_path, three_runs, "--force")
    assert rc3 == 0 and not (rec / "marker").exists()
    assert mr.check_record(rec) == []
    assert [p.name for p in rec.parent.iterdir()] == [rec.name]


# ------------------------------------------------------------------ refusals
def _refused(tmp_path, runs, capsys, needle, *extra):
    rc, rec = build(tmp_path, runs, *extra)
    err = capsys.readouterr().err
    assert rc == 1
    assert "REFUSED" in err and needle in err, err
    assert not rec.exists()
    assert_nothing_written(tmp_path)


def test_refuse_over_size(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1), make_run(tmp_path / "runs", 2, bytes_model=16_000_000 - len(CODE) + 1)]
    _refused(tmp_path, runs, capsys, "16 MB")


def test_refuse_inconsistent_bytes_total(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1, bytes_total=100)]
    _refused(tmp_path, runs, capsys, "bytes_total 100 != bytes_model")


def test_refuse_over_train_time(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1), make_run(tmp_path / "runs", 2, train_plus_hessian_seconds=600.5)]
    _refused(tmp_path, runs, capsys, "train_plus_hessian_seconds 600.50 > limit 600")


def test_refuse_over_own_train_limit(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1, max_wallclock_seconds=580.0, train_plus_hessian_seconds=590.0)]
    _refused(tmp_path, runs, capsys, "> limit 580")


def test_refuse_record_track_over_600_even_if_script_limit_higher(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1, max_wallclock_seconds=1200.0, train_plus_hessian_seconds=700.0)]
    _refused(tmp_path, runs, capsys, "> limit 600")


def test_refuse_over_eval_time(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1, eval_seconds=600.1), make_run(tmp_path / "runs", 2)]
    _refused(tmp_path, runs, capsys, "eval_seconds 600.10 > limit 600")


def test_refuse_config_mismatch(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1), make_run(tmp_path / "runs", 2, config={"MODEL_DIM": 576})]
    _refused(tmp_path, runs, capsys, "config MODEL_DIM: 512")


def test_config_mismatch_can_be_ignored_explicitly(tmp_path):
    runs = [make_run(tmp_path / "runs", 1), make_run(tmp_path / "runs", 2, config={"DATA_PATH": "/other/x"})]
    rc, rec = build(tmp_path, runs)
    assert rc == 1
    rc, rec = build(tmp_path, runs, "--ignore-config-key", "DATA_PATH")
    assert rc == 0
    assert mr.check_record(rec, ignore_config_keys={"DATA_PATH"}) == []


def test_refuse_code_hash_mismatch(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1), make_run(tmp_path / "runs", 2)]
    (runs[1] / "train_gpt.py").write_bytes(CODE.replace(b"hello", b"HELLO"))  # same size, other hash
    _refused(tmp_path, runs, capsys, "sha256")


def test_refuse_log_hash_mismatch(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1, log_override={"code_sha256": "f" * 64})]
    _refused(tmp_path, runs, capsys, "log code_sha256")


def test_refuse_different_code_between_seeds(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1), make_run(tmp_path / "runs", 2, code=CODE + b"#\n")]
    _refused(tmp_path, runs, capsys, "different code")


def test_refuse_duplicate_seed(tmp_path, capsys):
    runs = [make_run(tmp_path / "a", 1), make_run(tmp_path / "b", 1)]
    _refused(tmp_path, runs, capsys, "duplicate seed 1")


def test_refuse_same_dir_twice(tmp_path, capsys):
    d = make_run(tmp_path / "a", 1)
    _refused(tmp_path, [d, d], capsys, "duplicate seed")


@pytest.mark.parametrize("field", ["final_val_bpb", "bytes_total", "train_plus_hessian_seconds",
                                   "eval_seconds", "config", "code_sha256", "sliding_val_bpb"])
def test_refuse_missing_field(tmp_path, capsys, field):
    runs = [make_run(tmp_path / "runs", 1), make_run(tmp_path / "runs", 2, drop=(field,))]
    _refused(tmp_path, runs, capsys, f"missing field '{field}'")


def test_refuse_wrong_type(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1, steps="many")]
    _refused(tmp_path, runs, capsys, "'steps'")


def test_refuse_log_disagrees_with_summary(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1, log_override={"final_val_bpb": 1.2})]
    _refused(tmp_path, runs, capsys, "final val_bpb")


def test_refuse_final_metric_mismatch(tmp_path, capsys):
    runs = [make_run(tmp_path / "runs", 1, final_val_bpb=1.0, final_val_loss=2.0,
                     log_override={"final_val_bpb": 1.0, "final_val_loss": 2.0})]
    _refused(tmp_path, runs, capsys, "final_metric sliding")


def test_refuse_missing_files(tmp_path, capsys):
    d = make_run(tmp_path / "runs", 1)
    (d / "train.log").unlink()
    _refused(tmp_path, [d], capsys, "missing train.log")


def test_refuse_existing_folder_without_force(tmp_path, three_runs, capsys):
    rec = tmp_path / "records" / f"{DATE}_MyIdea"
    rec.mkdir(parents=True)
    rc, _ = build(tmp_path, three_runs)
    assert rc == 1 and "already exists" in capsys.readouterr().err
    assert list(rec.iterdir()) == []
    assert [p.name for p in rec.parent.iterdir()] == [rec.name]


def test_refuse_bad_name(tmp_path, three_runs, capsys):
    rc, _ = build(tmp_path, three_runs, name="bad name")
    assert rc == 1 and "--name" in capsys.readouterr().err
    assert_nothing_written(tmp_path)


def test_cli_subprocess_refusal_exit_code(tmp_path):
    d = make_run(tmp_path / "runs", 1, bytes_model=16_500_000)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_record.py"), str(d), "--name", "X",
                        "--out", str(tmp_path / "rec")], capture_output=True, text=True)
    assert r.returncode == 1 and "REFUSED" in r.stderr
    assert not (tmp_path / "rec").exists() or list((tmp_path / "rec").iterdir()) == []


# ------------------------------------------------------------------ --check on tampered folders
def _tamper(rec: Path, fn: str, f):
    p = rec / fn
    p.write_text(f(p.read_text()))


@pytest.mark.parametrize("how,needle", [
    ("json_bpb", "val_bpb"),
    ("json_seed_bpb", "final val_bpb"),
    ("code", "sha256"),
    ("log_missing", "missing train_seed2.log"),
    ("log_final", "final val_bpb"),
    ("json_missing", "missing field 'hardware'"),
    ("compliance", "compliance.train_under_600s"),
    ("bytes_total", "bytes_total"),
    ("folder_name", "folder name"),
])
def test_check_detects_tampering(tmp_path, three_runs, how, needle):
    rc, rec = build(tmp_path, three_runs)
    assert rc == 0
    sub = json.loads((rec / "submission.json").read_text())
    if how == "json_bpb":
        sub["val_bpb"] -= 0.001
    elif how == "json_seed_bpb":
        sub["seed_results"]["1"]["val_bpb"] -= 0.001
    elif how == "code":
        (rec / "train_gpt.py").write_bytes(CODE + b"\n")
    elif how == "log_missing":
        (rec / "train_seed2.log").unlink()
    elif how == "log_final":
        _tamper(rec, "train_seed3.log", lambda t: re.sub(r"(event:final .*val_bpb:)[0-9.]+", r"\g<1>0.5", t))
    elif how == "json_missing":
        del sub["hardware"]
    elif how == "compliance":
        sub["compliance"]["train_under_600s"] = False
    elif how == "bytes_total":
        sub["bytes_total"] += 1
    elif how == "folder_name":
        rec = rec.rename(rec.parent / "2026-05-02_Other")
    (rec / "submission.json").write_text(json.dumps(sub))
    problems = mr.check_record(rec)
    assert problems and any(needle in p for p in problems), problems
    assert mr.main(["--check", str(rec)]) == 1


# ------------------------------------------------------------------ statistics
def test_t_distribution_closed_forms():
    for t in (-3.0, -0.7, 0.0, 0.4, 1.5, 6.2, 40.0):
        assert rs.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
        assert rs.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    assert rs.t_sf(0.0, 7.3) == pytest.approx(0.5)
    assert rs.t_sf(math.inf, 3) == 0.0 and rs.t_sf(-math.inf, 3) == 1.0
    assert rs.t_sf(1.959963984540054, math.inf) == pytest.approx(0.025, abs=1e-12)


@pytest.mark.parametrize("t,df,upper", [
    (2.228138852, 10, 0.025),   # textbook critical values t_{1-a, df}
    (2.015048373, 5, 0.05),
    (6.964556734, 2, 0.01),
    (2.749995654, 30, 0.005),
    (1.812461123, 10, 0.05),
    (31.82051595, 1, 0.01),
    (4.540702858, 3, 0.01),
])
def test_t_critical_values(t, df, upper):
    assert rs.t_sf(t, df) == pytest.approx(upper, rel=1e-7)
    assert rs.t_cdf(-t, df) == pytest.approx(upper, rel=1e-7)


def test_betainc_identities():
    for x in (0.01, 0.3, 0.5, 0.77, 0.999):
        for a in (0.5, 1.0, 2.5, 7.0):
            assert rs.betainc(a, 1.0, x) == pytest.approx(x ** a, rel=1e-12)
            assert rs.betainc(1.0, a, x) == pytest.approx(1 - (1 - x) ** a, rel=1e-12)
        assert rs.betainc(3.3, 1.7, x) == pytest.approx(1 - rs.betainc(1.7, 3.3, 1 - x), abs=1e-13)
    for a in (0.5, 2.0, 11.0):
        assert rs.betainc(a, a, 0.5) == pytest.approx(0.5, abs=1e-13)
    assert rs.betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-13)  # polynomial form


def test_mean_std():
    assert rs.mean([1, 2, 3, 4]) == 2.5
    assert rs.sample_std([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(math.sqrt(32 / 7))
    assert rs.sample_std([1.5]) == 0.0


def test_welch_hand_computed():
    # ours [1,2,3]: mean 2, var 1; reference mean 6, std 2, n 3 (e.g. [4,6,8])
    r = rs.welch_one_sided([1.0, 2.0, 3.0], 6.0, 2.0, 3, margin=0.0)
    assert r.improvement == 4.0
    assert r.t_statistic == pytest.approx(4 / math.sqrt(5 / 3), rel=1e-12)  # 3.0983867
    assert r.welch_df == pytest.approx(50 / 17, rel=1e-12)                   # 2.9411765
    # df = 2 exactly -> closed-form p: ours [0,2] (var 2), ref mean 4 std sqrt2 n 2, margin 0.5
    r = rs.welch_one_sided([0.0, 2.0], 4.0, math.sqrt(2), 2, margin=0.5)
    t = 2.5 / math.sqrt(2)
    assert r.welch_df == pytest.approx(2.0)
    assert r.t_statistic == pytest.approx(t)
    assert r.p_value == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-10)  # 0.109566
    # an exact reference (n=1, std 0) gives the one-sample t-test with df = n-1
    r = rs.welch_one_sided([1.0, 2.0, 3.0], 4.0, 0.0, 1, margin=0.0)
    assert r.welch_df == 2 and r.t_statistic == pytest.approx(2 / (1 / math.sqrt(3)))


def test_welch_degenerate_cases():
    r = rs.welch_one_sided([1.0, 1.0], 2.0, 0.0, 1, margin=0.5)
    assert r.t_statistic == math.inf and r.p_value == 0.0
    r = rs.welch_one_sided([1.0, 1.0], 1.2, 0.0, 1, margin=0.5)
    assert r.p_value == 1.0
    with pytest.raises(rs.StatsError):
        rs.welch_one_sided([1.0], 2.0, 0.1, 3)
    with pytest.raises(rs.StatsError):
        rs.welch_one_sided([1.0, 2.0], 2.0, 0.1, 1)


def test_welch_matches_scipy_if_available():
    scipy_stats = pytest.importorskip("scipy.stats")
    ours = [1.0601, 1.0605, 1.0598]
    ref = [1.0650, 1.0660, 1.0646, 1.0655]
    margin = 0.002
    r = rs.welch_one_sided(ours, rs.mean(ref), rs.sample_std(ref), len(ref), margin=margin)
    # H1: mean(ref) - mean(ours) > margin  <=>  mean(ref - margin) > mean(ours)
    s = scipy_stats.ttest_ind([x - margin for x in ref], ours, equal_var=False, alternative="greater")
    assert r.t_statistic == pytest.approx(s.statistic, rel=1e-10)
    assert r.p_value == pytest.approx(s.pvalue, rel=1e-8)


def test_threshold_conversion():
    # users.md: 0.005 nats ~ 0.0030 BPB at 1.2244 BPB <-> 2.0727 nats, ~0.0023 at 1.06108 <-> 2.32203
    bpt = rs.bytes_per_token(val_loss=2.0727, val_bpb=1.2244)
    assert rs.nats_to_bpb(0.005, bpt) == pytest.approx(0.005 * 1.2244 / 2.0727, rel=1e-12)
    assert round(rs.nats_to_bpb(0.005, bpt), 4) == 0.0030
    bpt2 = rs.bytes_per_token(val_loss=2.32203, val_bpb=1.06108)
    assert round(rs.nats_to_bpb(0.005, bpt2), 4) == 0.0023
    # counts: bpb = loss/ln2 * tokens/bytes  <=>  nats = bpb * ln2 * bytes/tokens
    bpt3 = rs.bytes_per_token(val_tokens=1000, val_bytes=4000)
    assert bpt3 == 4.0
    assert rs.bpb_to_nats(1.0, bpt3) == pytest.approx(4 * LN2)
    assert rs.nats_to_bpb(rs.bpb_to_nats(1.234, bpt3), bpt3) == pytest.approx(1.234)


def test_compare_bpb_is_test_in_nats():
    ours = [1.0550, 1.0555, 1.0548]
    bpt = VAL_BYTES / VAL_TOKENS
    c = rs.compare_bpb(ours, 1.0611, 0.0009, 3, bpt)
    k = LN2 * bpt
    r = rs.welch_one_sided([x * k for x in ours], 1.0611 * k, 0.0009 * k, 3, margin=0.005)
    assert c["t_statistic"] == pytest.approx(r.t_statistic) and c["p_value"] == pytest.approx(r.p_value)
    # same as a test in BPB against the threshold converted to BPB
    r2 = rs.welch_one_sided(ours, 1.0611, 0.0009, 3, margin=rs.nats_to_bpb(0.005, bpt))
    assert c["p_value"] == pytest.approx(r2.p_value, rel=1e-9)
    assert c["delta_vs_reference_bpb"] == pytest.approx(rs.mean(ours) - 1.0611)
    assert c["delta_vs_reference_nats"] == pytest.approx((rs.mean(ours) - 1.0611) * k)


def test_record_with_reference_numbers(tmp_path, three_runs, capsys):
    rc, rec = build(tmp_path, three_runs, "--ref-bpb", "1.0700", "--ref-bpb-std", "0.0009", "--ref-n", "3")
    out = capsys.readouterr().out
    assert rc == 0
    sub = json.loads((rec / "submission.json").read_text())
    ours = [sub["seed_results"][str(s)]["val_bpb"] for s in (1, 2, 3)]
    bpt = VAL_BYTES / VAL_TOKENS
    exp = rs.compare_bpb(ours, 1.07, 0.0009, 3, bpt)
    for k in ("t_statistic", "welch_df", "p_value", "delta_vs_reference_bpb", "delta_vs_reference_nats"):
        assert sub[k] == pytest.approx(exp[k], rel=1e-12), k
    assert sub["comparison_baseline_bpb"] == 1.07 and sub["threshold_nats"] == 0.005
    assert sub["reference"] == {"source": "numbers", "unit": "bpb", "mean": 1.07, "std": 0.0009, "n": 3, "values": None}
    assert "p=" in out and "welch" in out.lower()
    assert "Comparison with the reference" in (rec / "README.md").read_text()
    assert mr.check_record(rec) == []
    # tampering with the p-value is detected
    sub["p_value"] = 0.5
    (rec / "submission.json").write_text(json.dumps(sub))
    assert any("p_value" in p for p in mr.check_record(rec))


def test_record_with_reference_values_and_record(tmp_path, three_runs):
    rc, rec = build(tmp_path, three_runs, "--ref-values", "1.0700", "1.0712", "1.0695")
    assert rc == 0
    sub = json.loads((rec / "submission.json").read_text())
    assert sub["reference"]["n"] == 3 and sub["reference"]["values"] == [1.07, 1.0712, 1.0695]
    assert sub["reference"]["std"] == pytest.approx(rs.sample_std([1.07, 1.0712, 1.0695]))
    # the record itself as reference: delta 0, improvement < threshold -> p large
    more = [make_run(tmp_path / "runs2", s) for s in (4, 5, 6)]
    rc, rec2 = build(tmp_path, more, "--ref-record", str(rec), name="Second")
    assert rc == 0
    sub2 = json.loads((rec2 / "submission.json").read_text())
    assert sub2["reference"]["source"].startswith("record:")
    assert sub2["reference"]["values"] == [sub["seed_results"][str(s)]["val_bpb"] for s in (1, 2, 3)]
    assert sub2["p_value"] > 0.5 and sub2["delta_vs_reference_bpb"] > 0
    assert mr.check_record(rec2) == []


def test_record_with_loss_reference(tmp_path, three_runs):
    rc, rec = build(tmp_path, three_runs, "--ref-loss-values", "2.9", "2.91", "2.905")
    assert rc == 0
    sub = json.loads((rec / "submission.json").read_text())
    ours = [sub["seed_results"][str(s)]["val_loss"] for s in (1, 2, 3)]
    r = rs.welch_one_sided(ours, rs.mean([2.9, 2.91, 2.905]), rs.sample_std([2.9, 2.91, 2.905]), 3, margin=0.005)
    assert sub["p_value"] == pytest.approx(r.p_value) and sub["reference"]["unit"] == "loss"
    assert mr.check_record(rec) == []


def test_single_seed_with_reference_has_null_test(tmp_path):
    runs = [make_run(tmp_path / "runs", 7)]
    rc, rec = build(tmp_path, runs, "--ref-bpb", "1.07")
    assert rc == 0
    sub = json.loads((rec / "submission.json").read_text())
    assert sub["p_value"] is None and sub["val_bpb_std"] == 0.0 and sub["delta_vs_reference_bpb"] < 0
    assert mr.check_record(rec) == []


# ------------------------------------------------------------------ log parsing helpers
def test_log_value_precision():
    assert mr.log_value_matches("1.060371", 1.0603711234)
    assert not mr.log_value_matches("1.060371", 1.0603721)
    assert mr.log_value_matches("4501", 4501) and not mr.log_value_matches("4501", 4502)
    assert mr.log_value_matches("1.5e-03", 0.00150004)
    assert not mr.log_value_matches("abc", 1.0)


def test_parse_log_keeps_colons_in_values(tmp_path):
    p = tmp_path / "x.log"
    p.write_text("noise\nevent:summary path:/a/b:c/summary.json\nevent:val step:1 val_bpb:2.0\nevent:val step:2 val_bpb:1.5\n")
    ev = mr.parse_log(p)
    assert ev["summary"][0]["path"] == "/a/b:c/summary.json"
    assert mr.last_event(ev, "val")["step"] == "2" and len(ev["val"]) == 2


def test_a_truncated_validation_set_is_not_a_record_track_run(tmp_path):
    """valid_score false (VAL_MAX_TOKENS > 0): refused for 10min_16mb with the way out named; non_record_16mb takes it."""
    d = make_run(tmp_path, 1, config={"VAL_MAX_TOKENS": 8192}, valid_score=False)
    with pytest.raises(mr.RecordError, match=r"valid_score is false \(VAL_MAX_TOKENS=8192.*--track non_record_16mb"):
        mr.load_run(d, "10min_16mb")
    assert mr.load_run(d, "non_record_16mb").summary["valid_score"] is False


def test_reference_record_on_another_validation_set_is_refused(tmp_path, three_runs, capsys):
    """A Welch test against a record that scored other val tokens / bytes (another tokenizer, a truncated val set)
    compares nothing: refused, naming both."""
    rc, rec = build(tmp_path, three_runs)
    assert rc == 0
    other = [make_run(tmp_path / "runs2", s, val_tokens=VAL_TOKENS // 2) for s in (4, 5, 6)]
    rc, _ = build(tmp_path, other, "--ref-record", str(rec), name="Other")
    assert rc != 0
    err = capsys.readouterr().err
    assert "scored another validation set or tokenizer" in err and f"{VAL_TOKENS:,}" in err


@pytest.mark.parametrize("over,why", [(dict(world_size=1), "world_size 1"), (dict(device="cpu", cuda_version=None), "not CUDA"),
                                      (dict(max_wallclock_seconds=900.0), "MAX_WALLCLOCK_SECONDS 900.0")])
def test_record_track_needs_8_cuda_gpus_and_the_600s_budget(tmp_path, over, why):
    d = make_run(tmp_path, 1, **over)
    with pytest.raises(mr.RecordError, match=f"not a record-track run: .*{why}.*--track non_record_16mb"):
        mr.load_run(d, "10min_16mb")
    mr.load_run(d, "non_record_16mb")
