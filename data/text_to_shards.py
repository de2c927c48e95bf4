#!/usr/bin/env python3
"""Turn .jsonl / .txt text plus a SentencePiece model into challenge token shards.

Shard format (same as the published FineWeb shards): 256 little-endian int32 header
[20240520 magic, 1 version, num_tokens, 0...] (1024 bytes), then num_tokens little-endian uint16.
Every document is written as [BOS] + sp.encode(text), no EOS; documents run across shard borders.

  python3 data/text_to_shards.py docs.jsonl --tokenizer tok.model --out-dir data/datasets/mine
  python3 data/text_to_shards.py a.txt b.jsonl -t tok.model --out-dir D --val-docs 100   # first 100 -> val
  python3 data/text_to_shards.py val.jsonl -t tok.model --out-dir D --split val
  python3 data/text_to_shards.py docs.jsonl -t caseops.model --out-dir D --caseops --val-docs 50000   # CaseOps

--caseops applies the lossless case transform of data/caseops.py to every document before tokenizing (use the
CaseOps tokenizer) and writes, beside each val shard, the byte sidecar fineweb_val_bytes_NNNNNN.bin: the ORIGINAL
text's UTF-8 bytes per token (BOS 0), which train_gpt.py uses for val_bpb. --byte-sidecar writes the sidecar for
plain (non-CaseOps) val shards too. The sidecar needs SentencePiece's piece offsets (pip install protobuf).

Documents: .jsonl = one JSON object per line (field --text-key); .txt = --txt-mode blank (default: paragraphs
separated by blank lines, so a .txt without blank lines is ONE document; a note says so), line (one document per
non-empty line) or file (the whole file). Input must be UTF-8: invalid bytes are an error naming the file and byte
offset, unless --errors replace (each invalid sequence becomes U+FFFD; the count is printed).

Safety: all shards are written to a temporary folder next to --out-dir and moved in only once the whole set is
complete, so a failure leaves earlier shards untouched. Input with no documents is an error, and so is
--val-docs N that leaves no document for train (nothing is written or removed in either case).

Library use (no train_gpt import; data/caseops.py beside it): write_shard(path, tokens), read_shard(path).
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import caseops  # noqa: E402  (data/caseops.py)

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
VALIDATION_ONLY_MARK = "fineweb_challenge_docs"  # challenge val docs: must never become train data


class ShardError(ValueError):
    pass


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write one shard atomically (tmp file + os.replace). Tokens must be ints in [0, 65535]."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShardError(f"{path}: tokens must be a 1-D integer array, got {tokens.dtype} shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > 0xFFFF):
        raise ShardError(f"{path}: token ids must fit uint16, got range [{tokens.min()}, {tokens.max()}]")
    if tokens.size >= 2**31:
        raise ShardError(f"{path}: {tokens.size} tokens do not fit the int32 header count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count. Raises ShardError saying what is wrong."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]}, expected {MAGIC}")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported version {header[1]}, expected {VERSION}")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: size {size} bytes, expected {HEADER_BYTES + 2 * max(n, 0)} for {n} tokens")
    return n


def read_shard(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Return a validated shard's tokens as uint16 (a read-only memmap when mmap=True)."""
    n = read_header(path)
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    return np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


# ---------------------------------------------------------------------------------------------- input
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}
_replaced = [0]  # invalid UTF-8 sequences replaced by U+FFFD under --errors replace (counted per input file)


def _count_replace(e: UnicodeError):
    _replaced[0] += 1
    return "\ufffd", e.end  # what the built-in "replace" handler returns


# The name is unique to this module object: a second load of this file (tests load it more than once) registers its
# own handler instead of redirecting the first one's count.
_REPLACE_ERRORS = f"text_to_shards_replace_{id(_replaced):x}"
codecs.register_error(_REPLACE_ERRORS, _count_replace)


def first_invalid_utf8(path: Path) -> tuple[int, int, int] | None:
    """(byte offset, byte value, 1-based line) of the first byte that is not valid UTF-8; None if the file is valid."""
    dec = codecs.getincrementaldecoder("utf-8")()
    pos = lines = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            buffered = dec.getstate()[0]  # an incomplete sequence carried over from the previous chunk
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                data = buffered + chunk
                return pos - len(buffered) + e.start, data[e.start], lines + data[:e.start].count(b"\n") + 1
            if not chunk:
                return None
            pos += len(chunk)
            lines += chunk.count(b"\n")


def iter_docs(path: Path, text_key: str = "text", txt_mode: str = "blank", errors: str = "strict") -> Iterator[str]:
    """Documents of one input file. .jsonl: one JSON object per line, text in `text_key`.
    .txt: `blank` = documents separated by blank lines, `line` = one per non-empty line, `file` = whole file.
    errors: "strict" (invalid UTF-8 is a ShardError naming the byte offset) or "replace" (U+FFFD)."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ShardError(f"{path}: unsupported input type {path.suffix!r} (expected .jsonl, .ndjson or .txt)")
    if errors not in ("strict", "replace"):
        raise ShardError(f"errors must be strict or replace, got {errors!r}")
    try:
        yield from _iter_docs(path, kind, text_key, txt_mode,
                              "strict" if errors == "strict" else _REPLACE_ERRORS)
    except UnicodeDecodeError as e:
        bad = first_invalid_utf8(path)
        where = (f"byte offset {bad[0]} (line {bad[2]}, byte 0x{bad[1]:02x})" if bad else f"near byte {e.start}")
        raise ShardError(f"{path}: not valid UTF-8 at {where}: {e.reason}; convert the file to UTF-8 "
                         f"or pass --errors replace to substitute U+FFFD") from None
    except OSError as e:
        raise ShardError(f"{path}: cannot read the input ({e.strerror or e})") from None


def _iter_docs(path: Path, kind: str, text_key: str, txt_mode: str, errors: str) -> Iterator[str]:
    if kind == "jsonl":
        with open(path, encoding="utf-8", errors=errors) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ShardError(f"{path}:{lineno}: invalid JSON ({e})") from None
                text = obj.get(text_key) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ShardError(f"{path}:{lineno}: no string field {text_key!r} (see --text-key)")
                yield text
    else:
        with open(path, encoding="utf-8", errors=errors) as f:
            if txt_mode == "file":
                text = f.read()
                if text.strip():
                    yield text
            elif txt_mode == "line":
                yield from (line.rstrip("\n") for line in f if line.strip())
            else:  # blank
                para: list[str] = []
                for line in f:
                    if line.strip():
                        para.append(line.rstrip("\n"))
                    elif para:
                        yield "\n".join(para)
                        para = []
                if para:
                    yield "\n".join(para)


# ---------------------------------------------------------------------------------------------- output
class ShardWriter:
    """Accumulates token arrays and writes fixed-size shards; the last shard holds the remainder."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.paths: list[Path] = []
        self.docs = self.tokens = 0

    def add_doc(self, tokens: np.ndarray) -> None:
        self.docs += 1
        self.tokens += tokens.size
        self.pending.append(tokens)
        self.n_pending += tokens.size
        while self.n_pending >= self.shard_tokens:
            buf = np.concatenate(self.pending)
            self._flush(buf[: self.shard_tokens])
            rest = buf[self.shard_tokens:]
            self.pending, self.n_pending = ([rest] if rest.size else []), rest.size

    def _flush(self, tokens: np.ndarray) -> None:
        path = self.out_dir / shard_name(self.split, len(self.paths))
        write_shard(path, tokens)
        self.paths.append(path)

    def close(self) -> None:
        if self.n_pending:
            self._flush(np.concatenate(self.pending))
            self.pending, self.n_pending = [], 0


def existing_shards(out_dir: Path, split: str) -> list[Path]:
    return sorted(p for p in out_dir.glob(f"fineweb_{split}_*.bin") if split == "val_bytes" or "_bytes_" not in p.name)


def load_tokenizer(model_path: Path):
    import sentencepiece as spm  # imported here so write_shard/read_shard work without sentencepiece

    if model_path.is_dir():
        raise ShardError(f"tokenizer {model_path} is a folder, expected a SentencePiece .model file")
    if not model_path.is_file():
        raise ShardError(f"tokenizer not found: {model_path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError on a bad proto
        raise ShardError(f"{model_path}: not a SentencePiece model (expected a .model file from spm_train, "
                         f"not the .vocab or another file): {str(e).strip()}") from None
    if sp.get_piece_size() > 65536:
        raise ShardError(f"{model_path}: vocab size {sp.get_piece_size()} does not fit uint16 shards (max 65536)")
    if sp.bos_id() < 0:
        raise ShardError(f"{model_path}: the model has no BOS id; challenge shards need [BOS] per document")
    return sp


def make_out_dir(out_dir: Path) -> bool:
    """Create out_dir if needed; return whether it was created. A clear ShardError when it cannot be a folder."""
    if out_dir.is_dir():
        return False
    for anc in (out_dir, *out_dir.parents):
        if anc.exists() or anc.is_symlink():
            if not anc.is_dir():
                what = "is" if anc == out_dir else f"is under {anc}, which is"
                raise ShardError(f"--out-dir {out_dir} {what} a file, expected a folder")
            break
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShardError(f"--out-dir {out_dir}: cannot create the folder ({e.strerror or e})") from None
    return True


def make_staging_dir(out_dir: Path) -> Path:
    """A fresh temporary folder next to out_dir (same file system, so the final moves are renames); inside
    out_dir when its parent is not writable. The shard globs of out_dir never look into it."""
    real = out_dir.resolve()
    try:
        return Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
    except OSError:
        pass
    try:
        return Path(tempfile.mkdtemp(prefix=".text_to_shards.tmp-", dir=real))
    except OSError as e:
        raise ShardError(f"--out-dir {out_dir}: cannot write there ({e.strerror or e})") from None


def install(staged: dict[str, list[Path]], stale: dict[str, list[Path]], out_dir: Path, backup: Path) -> list[Path]:
    """Move the complete new shard set from the staging folder into out_dir, replacing the old shards of the same
    splits. Old shards are first moved aside to `backup`; on any failure everything is put back as it was.
    Returns the old shards that the new set has no counterpart for (removed)."""
    backup.mkdir()
    moved_old: list[Path] = []
    placed: list[Path] = []
    try:
        for olds in stale.values():
            for old in olds:
                os.replace(old, backup / old.name)
                moved_old.append(old)
        for paths in staged.values():
            for path in paths:
                dst = out_dir / path.name
                os.replace(path, dst)
                placed.append(dst)
    except BaseException:
        for dst in placed:
            dst.unlink(missing_ok=True)
        for old in moved_old:
            os.replace(backup / old.name, old)
        raise
    new_names = {p.name for paths in staged.values() for p in paths}
    return [old for old in moved_old if old.name not in new_names]


def convert(inputs: list[Path], tokenizer: Path, out_dir: Path, split: str = "train", val_docs: int = 0,
            shard_tokens: int = 100_000_000, max_docs: int | None = None, text_key: str = "text",
            txt_mode: str = "blank", overwrite: bool = False, batch_docs: int = 256, case_ops: bool = False,
            byte_sidecar: bool = False, errors: str = "strict", log=print) -> dict[str, ShardWriter]:
    """Encode all inputs into shards. split='val': everything to val. split='train': the first `val_docs`
    documents to val, the rest to train. case_ops: CaseOps-transform every document and write the val byte
    sidecar (byte_sidecar: the sidecar without the transform). Returns the writers per split (docs/tokens/paths).
    All-or-nothing: the shards are staged in a temporary folder and replace the old ones (overwrite=True) only
    once complete; an input without documents, or val_docs leaving train empty, is a ShardError."""
    if split not in ("train", "val"):
        raise ShardError(f"split must be train or val, got {split!r}")
    if split == "val" and val_docs:
        raise ShardError("--val-docs only makes sense with --split train (with --split val every doc is val)")
    if shard_tokens <= 0 or val_docs < 0:
        raise ShardError("--shard-tokens must be > 0 and --val-docs >= 0")
    if max_docs is not None and max_docs < 1:
        raise ShardError(f"--max-docs must be >= 1, got {max_docs}")
    if errors not in ("strict", "replace"):
        raise ShardError(f"--errors must be strict or replace, got {errors!r}")
    for p in inputs:
        if p.is_dir():
            raise ShardError(f"input {p} is a folder, expected a .jsonl or .txt file")
        if not p.is_file():
            raise ShardError(f"input not found: {p}")
        if p.suffix.lower() not in SUFFIXES:
            raise ShardError(f"{p}: unsupported input type {p.suffix!r} (expected .jsonl, .ndjson or .txt)")
        # The challenge's own docs are the validation set; training on them would leak val into train.
        if VALIDATION_ONLY_MARK in p.name and split != "val":
            raise ShardError(f"refusing to write train shards from {p}: files named *{VALIDATION_ONLY_MARK}* "
                             f"are validation-only text; use --split val")
    sp = load_tokenizer(tokenizer)
    bos = sp.bos_id()
    splits = ["val"] if split == "val" else (["val", "train"] if val_docs else ["train"])
    created = make_out_dir(out_dir)
    stale = {s: existing_shards(out_dir, s) for s in splits}
    if any(stale.values()) and not overwrite:
        names = ", ".join(p.name for s in splits for p in stale[s][:3])
        raise ShardError(f"{out_dir} already holds shards ({names}...); pass --overwrite to replace them")
    sidecar = (case_ops or byte_sidecar) and "val" in splits
    if sidecar or (overwrite and "val" in splits):  # replaced val shards make the old byte sidecar stale too
        stale["val_bytes"] = existing_shards(out_dir, "val_bytes")
    staging: Path | None = None
    ok = False
    try:
        staging = make_staging_dir(out_dir)
        writers = {s: ShardWriter(staging, s, shard_tokens) for s in splits}
        if sidecar:  # same lengths as the val token shards, so both split at the same places
            writers["val_bytes"] = ShardWriter(staging, "val_bytes", shard_tokens)
        per_input: list[tuple[Path, int]] = []
        one_doc_txt: list[Path] = []  # .txt files without a blank line, read as ONE multi-line document

        def docs() -> Iterator[str]:
            n = 0
            for p in inputs:
                n_file, multiline, _replaced[0] = 0, False, 0
                for text in iter_docs(p, text_key, txt_mode, errors):
                    if max_docs is not None and n >= max_docs:
                        per_input.append((p, n_file))
                        return
                    n += 1
                    n_file += 1
                    multiline = multiline or "\n" in text
                    yield text
                per_input.append((p, n_file))
                if _replaced[0]:
                    log(f"warning: {p}: {_replaced[0]} invalid UTF-8 sequences replaced by U+FFFD (--errors replace)")
                if p.suffix.lower() == ".txt" and txt_mode == "blank" and n_file == 1 and multiline:
                    one_doc_txt.append(p)
                    log(f"note: {p} has no blank line, so it is read as ONE document (--txt-mode blank separates "
                        f"documents by blank lines; --txt-mode line makes every line a document)")

        def batches(it: Iterable[str]) -> Iterator[list[str]]:
            batch: list[str] = []
            for text in it:
                batch.append(text)
                if len(batch) == batch_docs:
                    yield batch
                    batch = []
            if batch:
                yield batch

        n_doc = 0
        for batch in batches(docs()):
            texts = [caseops.encode(t) for t in batch] if case_ops else batch
            dest = ["val" if split == "val" or n_doc + i < val_docs else "train" for i in range(len(texts))]
            # Val docs with a sidecar get their ids from token_bytes (offsets encode); the rest in one threaded call.
            plain = iter(sp.encode([t for t, d in zip(texts, dest) if not (sidecar and d == "val")], num_threads=os.cpu_count() or 1))
            for text, to in zip(texts, dest):
                if sidecar and to == "val":
                    ids, nbytes = caseops.token_bytes(sp, text)
                    if max(nbytes, default=0) > 0xFFFF:
                        raise ShardError(f"document {n_doc}: a token stands for {max(nbytes)} bytes, more than the uint16 sidecar holds")
                    writers["val_bytes"].add_doc(np.array([0] + nbytes, dtype=np.uint16))
                else:
                    ids = next(plain)
                arr = np.empty(len(ids) + 1, dtype=np.uint16)
                arr[0], arr[1:] = bos, ids
                writers[to].add_doc(arr)
                n_doc += 1
        counts = ", ".join(f"{p}: {n}" for p, n in per_input)
        if n_doc == 0:
            raise ShardError(f"no documents in the input ({counts}; .jsonl: one JSON object per line with a "
                             f"{text_key!r} string, .txt: non-blank text); nothing was written or removed")
        if "train" in writers and writers["train"].docs == 0:
            hint = "".join(f"; {p} has no blank line, so it was ONE document (try --txt-mode line)" for p in one_doc_txt)
            raise ShardError(f"--val-docs {val_docs} takes all {n_doc} documents ({counts}), none are left for train"
                             f"{hint}; use a smaller --val-docs, or --split val for a val-only set; "
                             f"nothing was written or removed")
        for w in writers.values():
            w.close()
        removed = install({s: w.paths for s, w in writers.items()}, stale, out_dir, staging / "replaced")
        for w in writers.values():
            w.out_dir, w.paths = out_dir, [out_dir / p.name for p in w.paths]
        ok = True
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not ok and created:
            try:
                out_dir.rmdir()  # only if still empty
            except OSError:
                pass
    # With --overwrite, shards beyond the new count would silently extend the dataset: they are removed.
    for old in removed:
        log(f"removed stale {old}")
    for s, w in writers.items():
        log(f"{s}: docs:{w.docs} tokens:{w.tokens} shards:{len(w.paths)} dir:{out_dir}")
    return writers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help=".jsonl or .txt files, read in order")
    ap.add_argument("-t", "--tokenizer", type=Path, required=True, help="SentencePiece .model file")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--split", choices=("train", "val"), default="train")
    ap.add_argument("--val-docs", type=int, default=0, help="with --split train: first N docs go to val shards")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--max-docs", type=int, default=None, help="stop after this many documents (all inputs)")
    ap.add_argument("--text-key", default="text", help="JSON field holding the text (.jsonl)")
    ap.add_argument("--txt-mode", choices=("blank", "line", "file"), default="blank",
                    help=".txt: docs separated by blank lines / one per line / one per file")
    ap.add_argument("--overwrite", action="store_true", help="replace existing shards of the written splits")
    ap.add_argument("--caseops", action="store_true", help="CaseOps-transform the text (data/caseops.py) and write the val byte sidecar")
    ap.add_argument("--byte-sidecar", action="store_true", help="write the val byte sidecar (original UTF-8 bytes per token) without CaseOps")
    ap.add_argument("--errors", choices=("strict", "replace"), default="strict",
                    help="input that is not valid UTF-8: strict (default) stops with the file and byte offset; "
                         "replace substitutes U+FFFD for each invalid sequence and prints how many")
    args = ap.parse_args(argv)
    try:
        convert(args.inputs, args.tokenizer, args.out_dir, split=args.split, val_docs=args.val_docs,
                shard_tokens=args.shard_tokens, max_docs=args.max_docs, text_key=args.text_key,
                txt_mode=args.txt_mode, overwrite=args.overwrite, case_ops=args.caseops, byte_sidecar=args.byte_sidecar,
                errors=args.errors)
    except (ShardError, RuntimeError, caseops.CaseOpsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, ...: nothing of the earlier shards was touched
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; existing shards are untouched", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
