"""Tests for data/text_to_shards.py and data/cached_challenge_fineweb.py (CPU, no network, a few seconds)."""
from __future__ import annotations

import functools
import http.server
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")

from conftest import load_data_script

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NEED_SHARED = pytest.mark.skipif(not (SHARED / "data").is_dir(),
                                 reason=f"shared data folder {SHARED}/data is absent (only present on the dev box)")


tts = load_data_script("text_to_shards")
dl = load_data_script("cached_challenge_fineweb")

WORDS = ("the cat dog runs over under blue green river stone light house garden 2024 data model token "
         "quick slow bright dark café naïve über north south east west alpha beta gamma").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Single-spaced, newline-free text, so NFKC + whitespace folding leaves it unchanged (exact round trip)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(make_docs(400, seed=123)), encoding="utf-8")
    # Same settings family as the challenge tokenizers (bpe, byte fallback, nfkc, ids 0..3), tiny vocab.
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tiny"), vocab_size=300, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc", pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    return d / "tiny.model"


def no_parts(d: Path) -> None:
    left = [p for p in d.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert not left, f"temporary files left behind: {left}"


def split_docs(tokens: np.ndarray, bos: int = 1) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == bos)
    assert starts.size and starts[0] == 0, "stream must start with BOS"
    return np.split(tokens, starts[1:])


# =============================================================================== text_to_shards
def test_shard_roundtrip_and_header(tmp_path):
    toks = np.array([1, 5, 65535, 0, 7], dtype=np.int64)
    p = tmp_path / "fineweb_train_000000.bin"
    tts.write_shard(p, toks)
    raw = p.read_bytes()
    assert len(raw) == 1024 + 2 * 5
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert tts.read_shard(p).tolist() == toks.tolist()
    assert tts.read_shard(p, mmap=True).dtype == np.uint16
    for bad in ([70000], [-1], [[1, 2]], [1.5]):
        with pytest.raises(tts.ShardError):
            tts.write_shard(tmp_path / "bad.bin", np.array(bad))
    p.write_bytes(raw[:-2])  # truncated
    with pytest.raises(tts.ShardError, match="expected 1034"):
        tts.read_shard(p)
    p.write_bytes(b"\0" * 4 + raw[4:])
    with pytest.raises(tts.ShardError, match="bad magic"):
        tts.read_shard(p)
    no_parts(tmp_path)


def test_jsonl_val_train_split(tmp_path, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    docs = make_docs(40, seed=1)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    out = tmp_path / "out"
    w = tts.convert([src], sp_model, out, val_docs=7, shard_tokens=300, text_key="body", log=lambda s: None)
    expect = {"val": docs[:7], "train": docs[7:]}
    for split in ("val", "train"):
        paths = sorted(out.glob(f"fineweb_{split}_*.bin"))
        assert [p.name for p in paths] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(paths))]
        assert paths == w[split].paths
        counts = [tts.read_header(p) for p in paths]
        assert all(c == 300 for c in counts[:-1]) and 0 < counts[-1] <= 300  # fixed size, remainder last
        stream = np.concatenate([tts.read_shard(p) for p in paths])
        n_expect = sum(len(sp.encode(d)) + 1 for d in expect[split])
        assert stream.size == sum(counts) == n_expect == w[split].tokens
        pieces = split_docs(stream)  # every doc = [BOS] + encode(text), no EOS
        assert len(pieces) == len(expect[split]) == w[split].docs
        for piece, text in zip(pieces, expect[split]):
            assert piece[0] == 1 and 2 not in piece.tolist()
            assert sp.decode(piece[1:].tolist()) == text
    no_parts(out)


def test_txt_modes_and_max_docs(tmp_path, sp_model):
    a, b, c = make_docs(3, seed=2)
    src = tmp_path / "in.txt"
    src.write_text(f"{a}\n{b}\n\n\n{c}\n", encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))

    def run(mode, **kw):
        out = tmp_path / f"o_{mode}_{len(kw)}"
        tts.convert([src], sp_model, out, txt_mode=mode, log=lambda s: None, **kw)
        return [sp.decode(p[1:].tolist()) for p in split_docs(tts.read_shard(out / "fineweb_train_000000.bin"))]

    # nmt_nfkc folds "\n" to a space, so a two-line document decodes with a space.
    assert run("blank") == [f"{a} {b}", c]
    assert run("line") == [a, b, c]
    assert run("file") == [f"{a} {b} {c}"]
    assert run("line", max_docs=2) == [a, b]


def test_refuses_validation_only_file_for_train(tmp_path, sp_model, capsys):
    src = tmp_path / "fineweb_challenge_docs_200.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(5)), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(tts.ShardError, match="validation-only"):
        tts.convert([src], sp_model, out, split="train")
    with pytest.raises(tts.ShardError, match="validation-only"):
        tts.convert([src], sp_model, out, split="train", val_docs=10)
    assert tts.main([str(src), "-t", str(sp_model), "--out-dir", str(out)]) == 1
    assert "refusing to write train shards" in capsys.readouterr().err
    assert not list(out.glob("*.bin"))
    assert tts.main([str(src), "-t", str(sp_model), "--out-dir", str(out), "--split", "val"]) == 0
    assert [p.name for p in out.glob("*.bin")] == ["fineweb_val_000000.bin"]


def test_overwrite_and_stale_shards(tmp_path, sp_model):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(30)), encoding="utf-8")
    out = tmp_path / "out"
    tts.convert([src], sp_model, out, shard_tokens=200, log=lambda s: None)
    assert len(list(out.glob("fineweb_train_*.bin"))) > 2
    with pytest.raises(tts.ShardError, match="--overwrite"):
        tts.convert([src], sp_model, out, log=lambda s: None)
    tts.convert([src], sp_model, out, overwrite=True, log=lambda s: None)  # one big shard; stale ones go
    assert [p.name for p in out.glob("fineweb_train_*.bin")] == ["fineweb_train_000000.bin"]


def test_cli_prints_counts(tmp_path, sp_model):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(12)), encoding="utf-8")
    r = subprocess.run([sys.executable, str(ROOT / "data" / "text_to_shards.py"), str(src), "-t", str(sp_model),
                        "--out-dir", str(tmp_path / "o"), "--val-docs", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "val: docs:2 " in r.stdout and "train: docs:10 " in r.stdout and "shards:1" in r.stdout


@NEED_SHARED
def test_shared_tokenizer_challenge_docs(tmp_path):
    model = SHARED / "data/tokenizers/fineweb_8192_bpe.model"
    src = SHARED / "data/text/fineweb_challenge_docs_200.jsonl"
    w = tts.convert([src], model, tmp_path, split="val", log=lambda s: None)
    # SOURCES.md: 420,773 sp8192 tokens in these 200 docs, plus one BOS per doc.
    assert (w["val"].docs, w["val"].tokens) == (200, 420_773 + 200)
    assert len(split_docs(tts.read_shard(tmp_path / "fineweb_val_000000.bin"))) == 200


@NEED_SHARED
def test_build_local_sample_script(tmp_path):
    out = tmp_path / "local_sp8192"
    r = subprocess.run(["bash", str(ROOT / "data/build_local_sample.sh")], capture_output=True, text=True,
                       env={**os.environ, "OUT_DIR": str(out), "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert tts.read_header(out / "fineweb_val_000000.bin") == 420_973
    assert tts.read_header(out / "fineweb_train_000000.bin") == 902_950  # 501 docs incl. BOS


# =============================================================================== downloader
class Handler(http.server.SimpleHTTPRequestHandler):
    fail_first: dict[str, int] = {}  # url path -> number of 503 answers before serving it
    short: set[str] = set()  # url paths served with a Content-Length larger than the body

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        if self.fail_first.get(self.path, 0) > 0:
            self.fail_first[self.path] -= 1
            self.send_error(503, "try later")
            return
        if self.path in self.short:
            body = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 100))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        super().do_GET()


VAL_SIZES, TRAIN_SIZES = (1500, 700), (2000, 1800, 2500)
DS = "datasets/datasets/fineweb10B_sp1024"  # <prefix=datasets>/datasets/<dataset>


@pytest.fixture
def remote(tmp_path, sp_model, monkeypatch):
    """A remote tree like the HF dataset: 2 val shards, 3 train shards, tokenizer files."""
    for var in ("MATCHED_FINEWEB_REPO_ID", "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "MATCHED_FINEWEB_REVISION", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "remote"
    (root / DS).mkdir(parents=True)
    (root / "datasets/tokenizers").mkdir()
    rng = np.random.default_rng(0)
    for split, sizes in (("val", VAL_SIZES), ("train", TRAIN_SIZES)):
        for i, n in enumerate(sizes):
            tts.write_shard(root / DS / f"fineweb_{split}_{i:06d}.bin", rng.integers(0, 300, n))
    shutil.copy(sp_model, root / "datasets/tokenizers/fineweb_1024_bpe.model")
    shutil.copy(sp_model.with_suffix(".vocab"), root / "datasets/tokenizers/fineweb_1024_bpe.vocab")
    return root


@pytest.fixture
def http_base(remote):
    Handler.fail_first, Handler.short = {}, set()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(remote)))
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    t.join(5)


@pytest.fixture(params=["http", "file"])
def base(request, remote):
    return request.getfixturevalue("http_base") if request.param == "http" else remote.as_uri()


def fetch(base, out, *extra):
    return dl.main(["--base-url", base, "--out-dir", str(out), "--train-shards", "3", "--workers", "2",
                    "--retries", "2", "--backoff", "0.01", "--timeout", "10", *extra])


def summary(text: str) -> dict[str, str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("summary:"))
    return dict(kv.split(":", 1) for kv in line.split()[1:])


def assert_same_tree(remote: Path, out: Path) -> None:
    for p in (remote / DS).glob("*.bin"):
        assert (out / "datasets/fineweb10B_sp1024" / p.name).read_bytes() == p.read_bytes(), p.name
    for p in (remote / "datasets/tokenizers").iterdir():
        assert (out / "tokenizers" / p.name).read_bytes() == p.read_bytes(), p.name


def test_download_then_resume(base, remote, tmp_path, capsys):
    out = tmp_path / "out"
    assert fetch(base, out) == 0
    s = summary(capsys.readouterr().out)
    assert (s["files"], s["downloaded"], s["skipped"]) == ("7", "7", "0")
    assert (s["val_shards"], s["val_tokens"]) == ("2", str(sum(VAL_SIZES)))  # all val shards, found by probing
    assert (s["train_shards"], s["train_tokens"]) == ("3", str(sum(TRAIN_SIZES)))
    assert_same_tree(remote, out)
    no_parts(out)
    assert fetch(base, out) == 0  # resume: everything verified, nothing fetched
    text = capsys.readouterr().out
    s = summary(text)
    assert (s["downloaded"], s["redownloaded"], s["skipped"], s["bytes_downloaded"]) == ("0", "0", "7", "0")
    assert "skip fineweb_train_000002.bin: present and verified (2500 tokens)" in text


def test_invalid_local_files_are_redownloaded(http_base, remote, tmp_path, capsys):
    out = tmp_path / "out"
    assert fetch(http_base, out, "--train-shards", "2") == 0
    d = out / "datasets/fineweb10B_sp1024"
    (d / "fineweb_train_000000.bin").write_bytes((d / "fineweb_train_000000.bin").read_bytes()[:-10])  # truncated
    (d / "fineweb_val_000001.bin").write_bytes(b"")  # 0-byte, as HF downloads sometimes leave
    raw = bytearray((d / "fineweb_val_000000.bin").read_bytes())
    raw[0] ^= 0xFF
    (d / "fineweb_val_000000.bin").write_bytes(bytes(raw))  # bad magic
    (out / "tokenizers/fineweb_1024_bpe.model").write_bytes(b"")
    (d / "fineweb_train_000001.bin.part").write_bytes(b"junk from a killed run")
    capsys.readouterr()
    assert fetch(http_base, out) == 0  # now 3 train shards: one new
    text = capsys.readouterr().out
    for name, why in (("fineweb_train_000000.bin", "expected 5024 for the header's 2000 tokens"),
                      ("fineweb_val_000001.bin", "shorter than the 1024-byte header"),
                      ("fineweb_val_000000.bin", "bad magic"), ("fineweb_1024_bpe.model", "size 0 bytes")):
        assert f"re-download {name}: local file invalid" in text and why in text, (name, text)
    s = summary(text)
    assert (s["redownloaded"], s["downloaded"], s["skipped"]) == ("4", "1", "2")
    assert "removed leftover" in text
    assert_same_tree(remote, out)
    no_parts(out)


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_corrupt_remote_shard_is_a_clear_error(base, remote, tmp_path, capsys, damage):
    p = remote / DS / "fineweb_train_000001.bin"
    raw = p.read_bytes()
    p.write_bytes(b"\x01\x02\x03\x04" + raw[4:] if damage == "magic" else raw[:-6])
    out = tmp_path / "out"
    assert fetch(base, out) == 1
    err = capsys.readouterr().err
    assert "fineweb_train_000001.bin is corrupt" in err
    assert ("bad magic" if damage == "magic" else "expected 4624 for the header's 1800 tokens") in err
    assert not (out / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin").exists()
    no_parts(out)


def test_cli_exit_code_and_message(remote, tmp_path):
    (remote / DS / "fineweb_train_000000.bin").write_bytes(b"")
    r = subprocess.run([sys.executable, str(ROOT / "data/cached_challenge_fineweb.py"), "--base-url", remote.as_uri(),
                        "--out-dir", str(tmp_path / "o"), "--train-shards", "1", "--retries", "0"],
                       capture_output=True, text=True, env={k: v for k, v in os.environ.items() if "FINEWEB" not in k})
    assert r.returncode == 1
    assert "fineweb_train_000000.bin is corrupt" in r.stderr and "Traceback" not in r.stderr
    no_parts(tmp_path / "o")


def test_missing_train_shard_and_val(base, remote, tmp_path, capsys):
    assert fetch(base, tmp_path / "a", "--train-shards", "5") == 1
    err = capsys.readouterr().err
    assert "fineweb_train_00000" in err and "--train-shards" in err
    shutil.rmtree(remote / DS)
    (remote / DS).mkdir()
    assert fetch(base, tmp_path / "b", "--variant", "sp1024") == 1
    assert "validation shard fineweb_val_000000.bin missing" in capsys.readouterr().err
    no_parts(tmp_path)


def test_retries_transient_errors(http_base, remote, tmp_path, capsys):
    Handler.fail_first = {f"/{DS}/fineweb_train_000001.bin": 2}
    assert fetch(http_base, tmp_path / "out") == 0
    assert capsys.readouterr().out.count("retry ") == 2
    assert_same_tree(remote, tmp_path / "out")
    # A body shorter than its Content-Length is retried, then reported with the file name.
    Handler.short = {f"/{DS}/fineweb_val_000000.bin"}
    assert fetch(http_base, tmp_path / "out2") == 1
    err = capsys.readouterr().err
    assert "fineweb_val_000000.bin" in err and "short read" in err and "failed after 3 attempts" in err
    no_parts(tmp_path)


def test_manifests(base, remote, tmp_path, capsys):
    # Per-variant manifest: only the listed val shard is fetched; sizes are enforced.
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted((remote / DS).glob("*.bin"))
             if p.name != "fineweb_val_000001.bin"]
    (remote / DS / "manifest.json").write_text(json.dumps({"files": files}))
    assert fetch(base, tmp_path / "a") == 0
    s = summary(capsys.readouterr().out)
    assert (s["val_shards"], s["val_tokens"], s["train_shards"]) == ("1", str(VAL_SIZES[0]), "3")
    next(f for f in files if f["name"] == "fineweb_train_000002.bin")["bytes"] += 2
    (remote / DS / "manifest.json").write_text(json.dumps({"files": files}))
    assert fetch(base, tmp_path / "b") == 1
    assert "fineweb_train_000002.bin" in capsys.readouterr().err
    (remote / DS / "manifest.json").unlink()
    # The challenge export's global manifest: counts and tokenizer paths.
    (remote / "datasets/manifest.json").write_text(json.dumps({
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_1024_bpe",
                      "stats": {"files_train": 3, "files_val": 1}}],
        "tokenizers": [{"name": "sp_1024_bpe", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}))
    assert fetch(base, tmp_path / "c") == 0
    assert summary(capsys.readouterr().out)["val_shards"] == "1"
    assert fetch(base, tmp_path / "d", "--train-shards", "4") == 1
    assert "has only 3 train shards" in capsys.readouterr().err
    no_parts(tmp_path)


def test_smoke_builder_never_overwrites_user_files(tmp_path):
    """Issue: PRESET=smoke with the user's own DATA_PATH (train shard + tokenizer, no val) replaced both. Now a partial
    set is refused with a DataError and every file is left byte-for-byte as it was; a complete set is reused."""
    import train_gpt as tg
    user = tmp_path / "mine"
    user.mkdir()
    tg.write_shard(user / "fineweb_train_000000.bin", np.arange(100) % 50)
    (user / "tok.model").write_bytes(b"the user's tokenizer")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    with pytest.raises(tg.DataError, match="never overwrites"):
        tg.build_smoke_dataset(str(user), str(user / "tok.model"), 512, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before
    fresh = tmp_path / "fresh"
    tg.build_smoke_dataset(str(fresh), str(fresh / "tok.model"), 512, log=lambda m: None)
    stamp = {p.name: p.stat().st_mtime_ns for p in fresh.iterdir()}
    tg.build_smoke_dataset(str(fresh), str(fresh / "tok.model"), 512, log=lambda m: None)  # complete: reused as is
    assert {p.name: p.stat().st_mtime_ns for p in fresh.iterdir()} == stamp
