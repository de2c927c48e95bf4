"""tools/contract.py against train_gpt.py: log lines written by its Logger parse back, a real smoke run's
summary.json passes the schema, atomic writes, env values read back by its parser, KNOWN_ENV in sync, and
docs/FORMATS.md matches what a smoke run writes. CPU, ~20 s (one smoke run + one --eval-only)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import contract  # noqa: E402

FORMATS = ROOT / "docs" / "FORMATS.md"


# -- log lines ---------------------------------------------------------------------------------

def test_logger_lines_round_trip(tmp_path, capsys):
    log = tg.Logger(tmp_path / "train.log", 0)
    kv = dict(step=40, neg=-3, loss=2.123456789, eps=1e-8, big=123456.789, zero=0.0, nan=float("nan"), fits=True, off=False,
              path=tmp_path / "a:b" / "summary.json", text="two words\nand a line", none=None, codec="brotli")
    log("probe", **kv)
    log.raw("some non-event line")
    log.raw("event:error kind:DataError msg:cannot read x: No such file (see README)")  # failure lines are raw
    ev = contract.read_events(tmp_path / "train.log", coerce_values=True)
    assert set(ev) == {"probe", "error"}
    got = ev["probe"][0]
    assert list(got) == list(kv)
    for k, v in kv.items():
        want = tg.Logger.fmt(v)
        if isinstance(v, float):
            assert got[k] == pytest.approx(float(want), nan_ok=True) and isinstance(got[k], float), k
        elif isinstance(v, (bool, int)):
            assert got[k] == int(v) and type(got[k]) is int, k
        else:
            assert got[k] == want, k
    assert got["eps"] == pytest.approx(1e-8) and got["text"] == "two_words_and_a_line" and got["none"] == "None"
    assert ev["error"][0] == {"kind": "DataError", "msg": "cannot read x: No such file (see README)"}
    strings = contract.read_events(tmp_path / "train.log")["probe"][0]  # the default keeps the printed text
    assert strings["step"] == "40" and strings["fits"] == "1" and strings["loss"] == tg.Logger.fmt(kv["loss"])
    capsys.readouterr()


def test_parse_line_rules():
    p = contract.parse_line
    assert p("noise") is None and p("event: x:1") is None and p("") is None
    assert p("[rank0]: event:stop step:9 junk reason:wallclock", coerce_values=True) == ("stop", {"step": 9, "reason": "wallclock"})
    assert p("[rank0]: event:stop step:9", strict=True) is None  # strict: the line starts with the event
    with pytest.raises(ValueError, match="junk"):
        p("event:stop step:9 junk", strict=True)
    assert p("event:summary path:/a/b:c/summary.json")[1] == {"path": "/a/b:c/summary.json"}
    assert p("event:x v:1_000 w:1e-3 s:12ab", coerce_values=True)[1] == {"v": "1_000", "w": 1e-3, "s": "12ab"}
    assert p("event:error msg:config: NUM_LAYERS='x': expected int", coerce_values=True)[1] == {"msg": "config: NUM_LAYERS='x': expected int"}
    ev = contract.parse_events("event:a k:1\nevent:b\nevent:a k:2\n")
    assert ev == {"a": [{"k": "1"}, {"k": "2"}], "b": [{}]} and contract.last_event(ev, "a") == {"k": "2"}
    assert [contract.as_bool(v) for v in (1, 0, "1", "false", "na")] == [True, False, True, False, None]


# -- a real smoke run --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One PRESET=smoke training run and one --eval-only of its artifact: {name: (run_dir, stdout)}."""
    tmp = tmp_path_factory.mktemp("smoke")
    out = {}
    for name, args in (("train", ()), ("eval", ("--eval-only", str(tmp / "train" / "final_model.ptz")))):
        env = dict(os.environ, PRESET="smoke", RUN_DIR=str(tmp / name), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out[name] = (tmp / name, r.stdout)
    return out


def test_real_summaries_pass_the_schema(smoke):
    for name, (run_dir, _) in smoke.items():
        s = json.loads((run_dir / "summary.json").read_text())
        assert contract.validate_summary(s) == [], name
        unknown = set(s) - set(contract.SUMMARY_FIELDS) - set(contract.SUMMARY_OPTIONAL)
        assert not unknown, f"train_gpt writes summary keys the contract does not know: {sorted(unknown)} (tools/contract.py, docs/FORMATS.md)"
    ev = json.loads((smoke["eval"][0] / "summary.json").read_text())
    assert ev["mode"] == "eval_only" and not set(contract.EVAL_ONLY_ABSENT) & set(ev)
    assert set(json.loads((smoke["train"][0] / "summary.json").read_text())) >= set(contract.SUMMARY_FIELDS)


def test_broken_summaries_are_rejected(smoke):
    s = json.loads((smoke["train"][0] / "summary.json").read_text())
    assert contract.validate_summary([s]) == ["summary.json: not a JSON object"]
    for change, needle in ((dict(steps="many"), "'steps'"), (dict(size_ok=1), "'size_ok'"), (dict(bytes_total=True), "'bytes_total'"),
                           (dict(final_val_bpb=float("nan")), "'final_val_bpb'"), (dict(cuda_version=3), "'cuda_version'"),
                           (dict(final_metric="best"), "final_metric 'best'"), (dict(ttt_phases={}), "'ttt_phases'")):
        problems = contract.validate_summary({**s, **change})
        assert len(problems) == 1 and needle in problems[0], (change, problems)
    missing = {k: v for k, v in s.items() if k != "val_bytes"}
    assert contract.validate_summary(missing, where="x") == ["x: missing field 'val_bytes'"]
    assert contract.validate_summary(missing, required=["seed"]) == []  # a reader may need fewer keys
    assert contract.validate_summary({**s, "peak_mem_gib": None, "sliding_val_bpb": None}) == []


def test_smoke_log_lines_are_documented(smoke):
    """Every event line of a real run parses strictly and matches one documented `event:` line of FORMATS.md: its keys
    are documented there and the documented keys not in [brackets] are present."""
    docs = documented_events()
    seen = set()
    for name, (run_dir, stdout) in smoke.items():
        log = (run_dir / "train.log").read_text()
        assert stdout.strip().splitlines() == log.strip().splitlines(), "stdout and train.log differ"
        for ev, lines in contract.parse_events(log, strict=True).items():
            assert ev in docs, f"event:{ev} is not documented in docs/FORMATS.md"
            seen.add(ev)
            if ev == "config":
                assert all(set(kv) == {f.name for f in tg.FIELDS} for kv in lines)
                assert set(lines[0]) <= contract.KNOWN_ENV, "KNOWN_ENV is stale: run `python3 tools/contract.py --regenerate`"
                continue
            for kv in lines:
                assert any(req <= set(kv) <= req | opt for req, opt in docs[ev]), (
                    f"event:{ev} keys {sorted(kv)} match no documented form {docs[ev]} in docs/FORMATS.md")
    assert {"config", "env", "data", "model", "warmup", "train", "stop", "gptq", "prequant", "artifact", "roundtrip",
            "sliding", "final", "summary", "done", "eval_only"} <= seen


def test_documented_events_exist_in_train_gpt():
    src = (ROOT / "train_gpt.py").read_text()
    emitted = set(re.findall(r"""\blog\(["'](\w+)["']""", src)) | set(re.findall(r"event:(\w+)", src))
    missing = set(documented_events()) - emitted
    assert not missing, f"docs/FORMATS.md documents events train_gpt.py never writes: {sorted(missing)}"
    undocumented = {e for e in re.findall(r"""\blog\(["'](\w+)["']""", src)} - set(documented_events())
    assert not undocumented, f"train_gpt.py logs events docs/FORMATS.md does not describe: {sorted(undocumented)}"


def test_documented_summary_table_is_the_schema():
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", FORMATS.read_text(), flags=re.M)
    schema = {**contract.SUMMARY_FIELDS, **contract.SUMMARY_OPTIONAL}
    assert [k for k, _ in rows] == list(schema), "docs/FORMATS.md's summary.json table != contract.SUMMARY_FIELDS + SUMMARY_OPTIONAL"
    for key, typ in rows:
        assert typ.strip() == contract.type_name(*schema[key]), key


def test_formats_cites_only_files_in_the_repo():
    cited = re.findall(r"`([\w.*-]+(?:/[\w.*<>-]*)*\.(?:py|md|toml|txt|sh)|[\w-]+/)`", FORMATS.read_text())
    assert len(cited) > 10
    for path in cited:
        if "<" in path or path.startswith("runs/"):
            continue
        assert list(ROOT.glob(path)) or (ROOT / path).exists(), f"docs/FORMATS.md cites {path}, not in the repo"


def documented_events() -> dict[str, list[tuple[set, set]]]:
    """FORMATS.md's `- `event:<name> key:<v> [key:<v>] ...`` bullets -> {name: [(required keys, optional keys), ...]}."""
    out: dict[str, list[tuple[set, set]]] = {}
    for name, rest in re.findall(r"^- `event:(\w+)([^`]*)`", FORMATS.read_text(), flags=re.M):
        req = set(re.findall(r"(?:^|\s)(\w+):", rest))
        opt = set(re.findall(r"\[(\w+):", rest))
        out.setdefault(name, []).append((req, opt))
    return out


# -- atomic write ------------------------------------------------------------------------------

def test_atomic_write(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.txt"
    contract.atomic_write_text(target, "old ü\n")
    assert target.read_bytes() == "old ü\n".encode() and target.stat().st_mode & 0o777 == 0o666 & ~contract._UMASK
    contract.atomic_write_bytes(target, b"\x00new")
    assert target.read_bytes() == b"\x00new"
    for where, exc in (("fsync", OSError(28, "No space left on device")), ("replace", KeyboardInterrupt())):
        def boom(*a, exc=exc):
            raise exc
        with monkeypatch.context() as m:
            m.setattr(contract.os, where, boom)
            with pytest.raises(type(exc)):
                contract.atomic_write_bytes(target, b"half" * 1000)
        assert target.read_bytes() == b"\x00new", where  # never a half file
        assert [p.name for p in target.parent.iterdir()] == ["f.txt"], where  # no temp left behind
    with pytest.raises(TypeError):
        contract.atomic_write_bytes(target, "not bytes")
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"] and target.read_bytes() == b"\x00new"


# -- env values --------------------------------------------------------------------------------

EXTRA = {bool: [True, False], int: [0, -3, 10 ** 12], float: [1e-8, 0.1, -2.5, 1e20, 600.0], str: ["", "q,k,v", "./data/x"]}


@pytest.mark.parametrize("field", tg.FIELDS, ids=[f.name for f in tg.FIELDS])
def test_env_value_reads_back_to_the_same_value(field):
    for v in [field.default, *EXTRA[field.type]]:
        back = tg._parse(field, contract.env_value(v), field.name)
        assert back == v and type(back) is field.type, (field.name, v, contract.env_value(v), back)


def test_env_value_from_toml():
    doc = tomllib.loads('b = true\ni = 7\nf = 1e-8\nwhole = 20000.0\ns = "SSSL"\nl = ["q", "k", "v"]\nn = [1, 2]\n')
    by = {f.name: f for f in tg.FIELDS}
    cases = [("b", "COMPILE", True), ("i", "NUM_LAYERS", 7), ("f", "ADAM_EPS", 1e-8), ("whole", "ITERATIONS", 20000),
             ("whole", "MAX_WALLCLOCK_SECONDS", 20000.0), ("i", "MATRIX_LR", 7.0), ("s", "WINDOW_PATTERN", "SSSL"),
             ("l", "TTT_TARGETS", "q,k,v"), ("n", "VE_LAYERS", "1,2")]
    for key, name, want in cases:
        back = tg._parse(by[name], contract.env_value(doc[key]), name)
        assert back == want and type(back) is type(want), (key, name, back)
    assert [contract.env_value(v) for v in (True, False, None, 3, 0.1, [True, 2])] == ["1", "0", "", "3", "0.1", "1,2"]
    for bad, exc in ((float("inf"), ValueError), ({"a": 1}, TypeError), ([[1]], TypeError)):
        with pytest.raises(exc):
            contract.env_value(bad)


# -- KNOWN_ENV and the tools using the contract ------------------------------------------------

def test_known_env_in_sync():
    text = (ROOT / "tools" / "contract.py").read_text()
    assert contract.known_env_block(tg) in text, "tools/contract.py KNOWN_ENV is stale: run `python3 tools/contract.py --regenerate`"
    assert contract.KNOWN_ENV == set(contract.known_env_names(tg))
    assert {"ATTN_BACKEND", "MLP_KERNEL", "COMPILE", "TTT_LR", "TTT_LORA_LR", "GPTQ_DAMP", "XSA_LAYERS", "RANK", "WORLD_SIZE", "LOCAL_RANK"} <= contract.KNOWN_ENV


def test_tools_share_the_contract_and_need_no_torch(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import contract, sweep, make_record, pack_code\n"
            "assert 'torch' not in sys.modules and 'train_gpt' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n"
            "assert make_record.env_value is contract.env_value and make_record.parse_log is contract.read_events\n"
            "assert not hasattr(sweep, 'KNOWN_CONFIG_ENV')\n"
            "assert set(sweep._SUMMARY_MAP) <= set(contract.SUMMARY_FIELDS)\n"
            "assert all(make_record.REQUIRED_SUMMARY_FIELDS[k] == contract.SUMMARY_FIELDS[k] for k in make_record.REQUIRED_SUMMARY_FIELDS)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "tools")], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for tool in ("sweep.py", "make_record.py", "pack_code.py", "contract.py"):  # scripts, from any cwd
        r = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in (r.stdout + r.stderr).lower(), (tool, r.stderr[-500:])
