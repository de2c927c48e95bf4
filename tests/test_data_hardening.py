"""Bad input to the data/ scripts: one clear error line, non-zero exit, and earlier results never destroyed.
text_to_shards: --overwrite is all-or-nothing (staged next to --out-dir), an input without documents is an error,
invalid UTF-8 names file + byte offset (or --errors replace), a .txt without blank lines cannot silently end up all
in val, bad paths / tokenizers are one-line errors. Downloader: offline fails within seconds with a hint.
CPU only, no network, a few seconds."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")

from conftest import load_data_script

ROOT = Path(__file__).resolve().parents[1]
TTS = ROOT / "data" / "text_to_shards.py"
DL = ROOT / "data" / "cached_challenge_fineweb.py"


tts = load_data_script("text_to_shards")
dl = load_data_script("cached_challenge_fineweb")

WORDS = "the cat dog runs over under blue green river stone light house garden data model token".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) for _ in range(n)]


def jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(make_docs(300, seed=5)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tiny"), vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2,
        unk_id=3, minloglevel=2)
    return d / "tiny.model"


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


def no_staging_left(parent: Path) -> None:
    left = [p.name for p in parent.rglob("*") if ".tmp" in p.name]
    assert not left, f"temporary files/folders left behind: {left}"


def cli(capsys, *argv) -> tuple[int, str, str]:
    """text_to_shards.main in-process (an uncaught exception fails the test: that is the raw traceback)."""
    rc = tts.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, *must: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for m in must:
        assert m in lines[0], (m, lines[0])


@pytest.fixture
def old_set(tmp_path, sp_model):
    """An output folder holding an earlier, multi-shard train + val set."""
    out = tmp_path / "out"
    tts.convert([jsonl(tmp_path / "old.jsonl", make_docs(40, seed=1))], sp_model, out, val_docs=5, shard_tokens=150,
                log=lambda m: None)
    assert len(list(out.glob("fineweb_train_*.bin"))) > 3
    return out


# ====================================================================== 1. --overwrite is all-or-nothing
def test_overwrite_failing_input_keeps_old_shards(tmp_path, sp_model, old_set, capsys):
    before = snapshot(old_set)
    bad = tmp_path / "bad.jsonl"
    jsonl(bad, make_docs(300, seed=2))  # > one 256-doc batch: several 150-token shards are written before the bad line
    with open(bad, "a", encoding="utf-8") as f:
        f.write('{"text": "cut off\n')
    rc, out, err = cli(capsys, bad, "-t", sp_model, "--out-dir", old_set, "--val-docs", "5", "--shard-tokens", "150",
                       "--overwrite")
    assert rc == 1
    one_line_error(err, f"{bad}:301", "invalid JSON")
    assert snapshot(old_set) == before  # not one old shard replaced or removed
    no_staging_left(tmp_path)


def test_overwrite_success_swaps_whole_set(tmp_path, sp_model, old_set, capsys):
    new = jsonl(tmp_path / "new.jsonl", make_docs(8, seed=3))
    rc, out, err = cli(capsys, new, "-t", sp_model, "--out-dir", old_set, "--val-docs", "2", "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in old_set.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert "removed stale" in out and "train: docs:6 " in out and "val: docs:2 " in out
    no_staging_left(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_empty_input_is_an_error_and_deletes_nothing(tmp_path, sp_model, old_set, capsys, content, suffix):
    before = snapshot(old_set)
    src = tmp_path / f"empty{suffix}"
    src.write_text(content, encoding="utf-8")
    for split in (["--split", "train"], ["--split", "val"], ["--val-docs", "3"]):
        rc, out, err = cli(capsys, src, "-t", sp_model, "--out-dir", old_set, "--overwrite", *split)
        assert rc == 1, (split, out)
        one_line_error(err, "no documents", str(src))
        assert snapshot(old_set) == before
    fresh = tmp_path / "fresh"
    assert cli(capsys, src, "-t", sp_model, "--out-dir", fresh)[0] == 1
    assert not fresh.exists()  # a folder made for nothing is removed again
    no_staging_left(tmp_path)


def test_write_failure_midway_keeps_old_shards(tmp_path, sp_model, old_set, capsys, monkeypatch):
    """Disk full / unwritable on the 3rd shard: one error line, old set intact, staging folder gone."""
    before = snapshot(old_set)
    real, calls = tts.write_shard, [0]

    def flaky(path, tokens):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, tokens)

    monkeypatch.setattr(tts, "write_shard", flaky)
    src = jsonl(tmp_path / "new.jsonl", make_docs(40, seed=4))
    rc, out, err = cli(capsys, src, "-t", sp_model, "--out-dir", old_set, "--shard-tokens", "150", "--overwrite")
    assert rc == 1 and calls[0] == 3
    one_line_error(err, "No space left on device", "untouched")
    assert snapshot(old_set) == before
    no_staging_left(tmp_path)


def test_failed_swap_is_rolled_back(tmp_path, sp_model, old_set, monkeypatch):
    """A rename failing while the new set is moved in (after the old set was moved aside and one new shard placed):
    everything goes back as it was."""
    before = snapshot(old_set)
    real, into_out = os.replace, [0]

    def flaky(src, dst):
        if Path(dst).parent == old_set and Path(src).parent != old_set:
            into_out[0] += 1
            if into_out[0] == 2:
                raise OSError(errno.EIO, "I/O error", str(dst))
        real(src, dst)

    monkeypatch.setattr(tts.os, "replace", flaky)
    with pytest.raises(OSError):
        tts.convert([jsonl(tmp_path / "n.jsonl", make_docs(20, seed=6))], sp_model, old_set, shard_tokens=150,
                    overwrite=True, log=lambda m: None)
    monkeypatch.undo()
    assert into_out[0] > 2  # the failure, then the rollback moving the old set back
    assert snapshot(old_set) == before
    no_staging_left(tmp_path)


def test_overwriting_val_removes_its_stale_byte_sidecar(tmp_path, sp_model):
    pytest.importorskip("google.protobuf")
    out = tmp_path / "o"
    src = jsonl(tmp_path / "v.jsonl", make_docs(6, seed=7))
    tts.convert([src], sp_model, out, split="val", byte_sidecar=True, log=lambda m: None)
    assert (out / "fineweb_val_bytes_000000.bin").exists()
    tts.convert([src], sp_model, out, split="val", overwrite=True, log=lambda m: None)  # plain val: old sidecar stale
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_val_000000.bin"]


# ====================================================================== 2. non-UTF-8 input
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_names_file_and_byte_offset(tmp_path, sp_model, old_set, capsys, suffix):
    before = snapshot(old_set)
    head = (json.dumps({"text": "héllo wörld"}, ensure_ascii=False) + "\n").encode() if suffix == ".jsonl" \
        else "héllo wörld\n\nsecond doc\n".encode()
    src = tmp_path / f"latin1{suffix}"
    src.write_bytes(head + (b'{"text": "caf\xe9"}\n' if suffix == ".jsonl" else b"caf\xe9\n"))
    offset = len(head) + (len(b'{"text": "caf') if suffix == ".jsonl" else 3)
    rc, out, err = cli(capsys, src, "-t", sp_model, "--out-dir", old_set, "--overwrite")
    assert rc == 1
    one_line_error(err, str(src), f"byte offset {offset}", "line ", "0xe9", "--errors replace")
    assert snapshot(old_set) == before
    # --errors replace: U+FFFD, counted; the result equals Python's own "replace" decoding
    rc, out, err = cli(capsys, src, "-t", sp_model, "--out-dir", tmp_path / "r", "--errors", "replace")
    assert rc == 0, err
    assert f"warning: {src}: 1 invalid UTF-8 sequences replaced by U+FFFD" in out
    docs = list(tts.iter_docs(src, errors="replace"))
    assert docs[-1].endswith("caf\ufffd") and src.read_bytes().decode("utf-8", "replace").count("\ufffd") == 1


def test_binary_input_is_one_line_error(tmp_path, sp_model):
    src = tmp_path / "blob.txt"
    src.write_bytes(bytes(range(256)) * 40)
    r = subprocess.run([sys.executable, str(TTS), str(src), "-t", str(sp_model), "--out-dir", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    one_line_error(r.stderr, str(src), "byte offset 128", "(line 2, byte 0x80)")
    assert not (tmp_path / "o").exists()
    h = subprocess.run([sys.executable, str(TTS), "--help"], capture_output=True, text=True).stdout
    assert "--errors {strict,replace}" in h and "U+FFFD" in h


def test_first_invalid_utf8_across_chunks(tmp_path):
    mib = 1 << 20
    p = tmp_path / "x.txt"
    p.write_bytes(b"a" * (mib - 1) + "é".encode() + b"\nok\n" + b"\xc3")  # é straddles the chunk edge; cut at EOF
    assert tts.first_invalid_utf8(p) == (mib + 5, 0xC3, 3)
    p.write_bytes(b"a\n" * 10 + "€".encode()[:2] + b"b")
    assert tts.first_invalid_utf8(p) == (20, 0xE2, 11)
    p.write_bytes("fine ✓\n".encode() * 1000)
    assert tts.first_invalid_utf8(p) is None


# ====================================================================== 3. documents and the val split
def test_txt_without_blank_lines_cannot_all_go_to_val(tmp_path, sp_model, old_set, capsys):
    before = snapshot(old_set)
    lines = make_docs(10, seed=8)
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc, out, err = cli(capsys, src, "-t", sp_model, "--out-dir", old_set, "--val-docs", "3", "--overwrite")
    assert rc == 1
    one_line_error(err, "--val-docs 3", "all 1 documents", "none are left for train", "--txt-mode line")
    assert "note:" in out and "ONE document" in out
    assert snapshot(old_set) == before
    rc, out, err = cli(capsys, src, "-t", sp_model, "--out-dir", tmp_path / "ok", "--val-docs", "3",
                       "--txt-mode", "line")
    assert rc == 0, err
    assert "val: docs:3 " in out and "train: docs:7 " in out and "note:" not in out
    # without a val split the one-document reading is kept (build_local_sample relies on it) but announced
    rc, out, err = cli(capsys, src, "-t", sp_model, "--out-dir", tmp_path / "one")
    assert rc == 0 and "train: docs:1 " in out and f"note: {src} has no blank line" in out


def test_val_docs_taking_every_document_is_an_error(tmp_path, sp_model, capsys):
    src = jsonl(tmp_path / "few.jsonl", make_docs(4))
    rc, out, err = cli(capsys, src, "-t", sp_model, "--out-dir", tmp_path / "o", "--val-docs", "4")
    assert rc == 1
    one_line_error(err, "all 4 documents", "--split val")
    assert not (tmp_path / "o").exists()
    assert cli(capsys, src, "-t", sp_model, "--out-dir", tmp_path / "o", "--val-docs", "3")[0] == 0


# ====================================================================== 5. bad paths, bad tokenizer
def test_bad_paths_and_tokenizers_are_one_line_errors(tmp_path, sp_model, old_set, capsys):
    before = snapshot(old_set)
    src = jsonl(tmp_path / "in.jsonl", make_docs(3))
    afile = tmp_path / "afile"
    afile.write_text("x")
    notsp = tmp_path / "tok.model"
    notsp.write_text("this is not a sentencepiece model")
    cases = [
        ([tmp_path / "missing.jsonl", "-t", sp_model, "--out-dir", old_set], ["input not found", "missing.jsonl"]),
        ([tmp_path, "-t", sp_model, "--out-dir", old_set], [f"input {tmp_path} is a folder"]),
        ([tmp_path / "x.csv", "-t", sp_model, "--out-dir", old_set], ["unsupported input type '.csv'"]),
        ([src, "-t", sp_model, "--out-dir", afile / "sub"], [f"{afile / 'sub'} is under {afile}", "expected a folder"]),
        ([src, "-t", sp_model, "--out-dir", afile], [f"--out-dir {afile} is a file, expected a folder"]),
        ([src, "-t", notsp, "--out-dir", old_set], [str(notsp), "not a SentencePiece model"]),
        ([src, "-t", sp_model.with_suffix(".vocab"), "--out-dir", old_set], ["tiny.vocab", "not a SentencePiece model"]),
        ([src, "-t", tmp_path, "--out-dir", old_set], ["is a folder, expected a SentencePiece .model"]),
        ([src, "-t", tmp_path / "nope.model", "--out-dir", old_set], ["tokenizer not found"]),
        ([src, "-t", sp_model, "--out-dir", old_set, "--overwrite", "--max-docs", "0"], ["--max-docs must be >= 1"]),
    ]
    (tmp_path / "x.csv").write_text("a,b\n")
    for argv, must in cases:
        rc, out, err = cli(capsys, *argv)
        assert rc == 1, argv
        one_line_error(err, *must)
        assert snapshot(old_set) == before and afile.read_text() == "x"
    no_staging_left(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_out_dir(tmp_path, sp_model, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, out, err = cli(capsys, jsonl(tmp_path / "in.jsonl", make_docs(3)), "-t", sp_model, "--out-dir", ro / "d")
        assert rc == 1
        one_line_error(err, str(ro / "d"))
    finally:
        ro.chmod(0o755)


# ====================================================================== 4. downloader offline
def _dl_cli(*argv, timeout=30):
    env = {k: v for k, v in os.environ.items() if "FINEWEB" not in k and "proxy" not in k.lower()}
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, str(DL), *map(str, argv)], capture_output=True, text=True, env=env,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the downloader was still retrying after {timeout}s (offline should fail within seconds)")
    return r, time.time() - t0


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def assert_offline_hint(err: str, host: str) -> None:
    one_line_error(err, f"cannot reach {host}", f"network access to {host}", "PRESET=smoke", "text_to_shards.py")
    assert "Traceback" not in err


def test_offline_connection_refused_fails_fast(tmp_path):
    r, dt = _dl_cli("--base-url", f"http://127.0.0.1:{_closed_port()}", "--out-dir", tmp_path / "o")  # default retries
    assert r.returncode == 1 and dt < 10, (dt, r.stderr)
    assert_offline_hint(r.stderr, "127.0.0.1")
    assert "Connection refused" in r.stderr


def test_offline_no_dns_fails_fast(tmp_path, monkeypatch, capsys):
    def no_dns(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for var in ("MATCHED_FINEWEB_REPO_ID", "MATCHED_FINEWEB_REVISION", "HF_TOKEN", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.time()
    assert dl.main(["--variant", "sp8192", "--out-dir", str(tmp_path / "o"), "--backoff", "0.01"]) == 1
    assert time.time() - t0 < 5
    err = capsys.readouterr().err
    assert_offline_hint(err, "huggingface.co")
    assert "DNS lookup failed" in err


def test_offline_no_answer_fails_after_probe_timeout(tmp_path):
    hole = socket.socket()  # accepts connections (kernel backlog) but never answers
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    try:
        r, dt = _dl_cli("--base-url", f"http://127.0.0.1:{hole.getsockname()[1]}", "--out-dir", tmp_path / "o",
                        "--probe-timeout", "0.5")
    finally:
        hole.close()
    assert r.returncode == 1 and dt < 10, (dt, r.stderr)
    assert_offline_hint(r.stderr, "127.0.0.1")
    assert "no answer within 0.5s" in r.stderr


def test_unreachable_after_first_answer_is_still_retried():
    """Once the host has answered, a refused connection is a blip: retried as before, not reported as offline."""
    d = dl.Downloader(f"http://127.0.0.1:{_closed_port()}", retries=1, backoff=0.01, timeout=5, token=None,
                      log=lambda m: None)
    d.reached = True
    with pytest.raises(dl.DownloadError, match="failed after 2 attempts"):
        d.get_json("x.json")


def test_downloader_out_dir_under_a_file(tmp_path):
    (tmp_path / "f").write_text("keep")
    r, _ = _dl_cli("--base-url", tmp_path.as_uri(), "--out-dir", tmp_path / "f" / "data")
    assert r.returncode == 1
    one_line_error(r.stderr, f"{tmp_path / 'f'} is a file, expected a folder", "--out-dir")
    assert (tmp_path / "f").read_text() == "keep"
