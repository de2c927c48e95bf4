"""tools/pack_code.py: packed code behaves like the original (CPU, fast)."""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "tools"))
import pack_code  # noqa: E402

HAS_BROTLI = importlib.util.find_spec("brotli") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None


def run_py(path: Path, env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env,
                          cwd=str(cwd or path.parent), timeout=300)


def lines_without_size(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if not ln.startswith("code_bytes ")]


def reported_size(out: str) -> int:
    return int(next(ln for ln in out.splitlines() if ln.startswith("code_bytes ")).split()[1])


@pytest.mark.parametrize("codec", ["lzma"] + (["brotli"] if HAS_BROTLI else []) + ["auto"])
def test_packed_fixture_behaves_like_original(tmp_path, codec):
    src = FIX / "pack_fixture.py"
    out = tmp_path / "pack_fixture.py"  # same basename: every printed line but the size must match
    info = pack_code.pack_file(src, out, codec=codec)
    assert info["packed_bytes"] == out.stat().st_size < src.stat().st_size
    if codec != "auto":
        assert info["codec"] == codec
    a, b = run_py(src), run_py(out)
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    assert lines_without_size(a.stdout) == lines_without_size(b.stdout)
    # getsource (function + class), the jit-like decorator and __main__ all worked
    assert "jit_ok True" in b.stdout and "name __main__" in b.stdout
    # __file__ is the packed file: the size the program reports is the packed size
    assert reported_size(a.stdout) == src.stat().st_size
    assert reported_size(b.stdout) == out.stat().st_size


def test_no_strip_and_keep_docstrings_modes(tmp_path):
    src = FIX / "pack_fixture.py"
    for kw in (dict(strip=False), dict(keep_docstrings=True), dict(indent=4)):
        out = tmp_path / "pack_fixture.py"
        pack_code.pack_file(src, out, codec="lzma", **kw)
        a, b = run_py(src), run_py(out)
        assert b.returncode == 0, (kw, b.stderr)
        assert lines_without_size(a.stdout) == lines_without_size(b.stdout), kw
        assert reported_size(b.stdout) == out.stat().st_size
        out.unlink()
    raw = tmp_path / "raw.py"
    pack_code.pack_file(src, raw, strip=False)
    assert pack_code.unpack_source(raw.read_text()) == src.read_text()


def test_strip_removes_comments_and_docstrings_keeps_semantics():
    src = (FIX / "pack_fixture.py").read_text()
    out = pack_code.strip_source(src)
    assert "#" not in out  # no comments survive (the fixture has no '#' inside strings)
    assert "A docstring that the packer removes" not in out
    assert "method docstring" not in out
    # the stripped program equals the original minus docstrings, node for node
    ref = pack_code._without_docstrings(ast.parse(src))
    assert ast.dump(ast.parse(out)) == ast.dump(ref)


def test_strip_handles_bodies_that_become_empty():
    src = 'def f():\n    "only a docstring"\nclass C:\n    "doc"\ntry:\n    "x"\nfinally:\n    "y"\nif 1:\n    pass\nelse:\n    "z"\n'
    out = pack_code.strip_source(src)
    ns: dict = {}
    exec(compile(out, "<t>", "exec"), ns)
    assert ns["f"]() is None and isinstance(ns["C"], type)


def test_unpack_roundtrip_and_refuse_double_pack(tmp_path):
    src = FIX / "pack_fixture.py"
    out = tmp_path / "p.py"
    pack_code.pack_file(src, out)
    body = pack_code.unpack_source(out.read_text())
    assert body == pack_code.strip_source(src.read_text())
    assert pack_code.unpack_source(src.read_text()) is None
    with pytest.raises(pack_code.PackError):
        pack_code.pack_file(out, tmp_path / "q.py")
    with pytest.raises(pack_code.PackError):
        pack_code.pack_file(src, src)
    # atomic write: no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.py"]


def test_cli_pack_reports_sizes_and_unpack(tmp_path):
    out = tmp_path / "packed.py"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "pack_code.py"), str(FIX / "pack_fixture.py"),
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{(FIX / 'pack_fixture.py').stat().st_size:,} bytes" in r.stdout
    assert f"packed {out.stat().st_size:,} bytes" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "pack_code.py"), "--unpack", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "def jitlike" in r.stdout


def test_wrapper_is_small():
    text = pack_code.pack_source("print(1)\n", codec="lzma")
    payload = pack_code.WRAPPER_RE.match(text).group(2)
    assert len(text) - len(payload) < 250


def packed_run_matches(src, tmp_path) -> str:
    """Pack `src`, run original and packed, assert both succeed with the same stdout; return it."""
    out = tmp_path / src.name
    pack_code.pack_file(src, out)
    a, b = run_py(src), run_py(out)
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    assert a.stdout == b.stdout
    return b.stdout


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_torch_compile_traces_packed_function(tmp_path):
    assert "graphs 1 " in packed_run_matches(FIX / "pack_fixture_torch.py", tmp_path)  # dynamo traced the function defined in the packed code


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (CPU box); runs where triton is")
def test_triton_jit_kernel_in_packed_code(tmp_path):
    assert "jit JITFunction True" in packed_run_matches(FIX / "pack_fixture_triton.py", tmp_path)


def test_verify_passes_on_deterministic_smoke(tmp_path, capsys):
    src = FIX / "fake_smoke.py"
    packed = tmp_path / "fake_smoke.py"
    pack_code.pack_file(src, packed)
    ok, report = pack_code.verify(src, packed)
    assert ok, "\n".join(report)
    rc = pack_code.main(["--verify", str(src)])
    assert rc == 0
    err = capsys.readouterr().err  # progress while the two smoke runs go
    assert "[verify] smoke run with the original file" in err and "[verify] packed: exit 0 after" in err


def test_verify_fails_when_artifacts_differ(tmp_path):
    src = FIX / "fake_smoke.py"
    packed = tmp_path / "fake_smoke.py"
    pack_code.pack_file(src, packed)
    ok, report = pack_code.verify(src, packed, cmd_template="FAKE_MODE=bad PRESET=smoke {python} {file}")
    assert not ok
    assert any("DIFFERENT" in ln for ln in report)


def test_verify_fails_when_command_fails(tmp_path):
    src = FIX / "fake_smoke.py"
    packed = tmp_path / "fake_smoke.py"
    pack_code.pack_file(src, packed)
    ok, report = pack_code.verify(src, packed, cmd_template="{python} {file}")  # no PRESET -> exits 1
    assert not ok
    assert any("command failed" in ln for ln in report)


def test_existing_output_binary_input_and_missing_grid_are_one_line_errors(tmp_path, capsys):
    """pack_code never replaces an existing output without --force, names a non-UTF-8 input; sweep names a missing grid."""
    import pack_code
    import sweep
    src = tmp_path / "a.py"
    src.write_text("x = 1\n", encoding="utf-8")
    out = tmp_path / "a.packed.py"
    out.write_text("earlier result\n", encoding="utf-8")
    assert pack_code.main([str(src), "-o", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "earlier result\n"
    assert pack_code.main([str(src), "-o", str(out), "--force"]) == 0 and pack_code.unpack_source(out.read_text()) is not None
    keep = tmp_path / "keep.py"  # --unpack -o follows the same rule
    keep.write_text("earlier result\n", encoding="utf-8")
    assert pack_code.main(["--unpack", str(out), "-o", str(keep)]) == 1 and keep.read_text() == "earlier result\n"
    assert "exists; pass --force" in capsys.readouterr().err
    assert pack_code.main(["--unpack", str(out), "-o", str(keep), "--force"]) == 0 and keep.read_text() == "x = 1\n"
    binary = tmp_path / "b.py"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert pack_code.main([str(binary), "-o", str(tmp_path / "b.out")]) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert sweep.main([str(tmp_path / "missing.toml"), "--dry-run"]) == 2
    assert "no such grid file" in capsys.readouterr().err
