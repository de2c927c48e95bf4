#!/usr/bin/env python3
"""Download the published FineWeb challenge shards and tokenizer for one variant (stdlib only).

  python3 data/cached_challenge_fineweb.py --variant sp1024 [--train-shards 80] [--out-dir data]
  MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python3 data/cached_challenge_fineweb.py --variant sp8192

Writes <out-dir>/datasets/fineweb10B_<variant>/fineweb_{train,val}_%06d.bin and
<out-dir>/tokenizers/fineweb_<N>_bpe.{model,vocab}. Disk: a train shard holds 1e8 uint16 tokens,
~200 MB, so the default 80 shards need ~16 GB, plus ~0.1-0.2 GB of val (sp1024 val: 62M tokens, 124 MB).

Remote layout ({base}/{path}; base defaults to https://huggingface.co/datasets/{repo}/resolve/{revision}):
  <prefix>/datasets/fineweb10B_<variant>/fineweb_{train,val}_%06d.bin
  <prefix>/tokenizers/fineweb_<N>_bpe.{model,vocab}
  optional: <prefix>/datasets/fineweb10B_<variant>/manifest.json  {"files": [{"name": ..., "bytes": ...}]}
  optional: <prefix>/manifest.json  (the challenge export's manifest: per-dataset files_train/files_val)
Without a manifest all val shards are fetched by probing index 0, 1, ... until one is missing.

Every file is written to <name>.part and renamed only after it verifies (shards: magic 20240520,
version 1, size == 1024 + 2*num_tokens, Content-Length and manifest size when known). Re-running
resumes: files that exist AND verify are skipped; missing or invalid ones (0-byte, truncated, bad
header) are downloaded again. Network errors are retried with exponential backoff, except before the host has
answered once: then an unreachable host (no DNS, refused, no route, no answer within --probe-timeout) is an error at
once, with a hint for working offline (PRESET=smoke, data/text_to_shards.py, --base-url file://...).
"""
from __future__ import annotations

import argparse
import errno
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REPO = "willdepueoai/parameter-golf"
MIRROR_HINT = "sp4096/sp8192 are published in kevclark/parameter-golf: set MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf"
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 1024
SHARD_BYTES_EST = HEADER_BYTES + 2 * 100_000_000  # one full 1e8-token shard
CHUNK = 1 << 20
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)
UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
OFFLINE_HINT = ("without network access use local data: PRESET=smoke python train_gpt.py (builds tiny data itself), "
                "python data/text_to_shards.py (shards from your own text, data/README.md), or --base-url file:///mirror")


class DownloadError(Exception):
    """Permanent failure; the message names the file and what was expected."""


class Missing(DownloadError):
    """The remote file does not exist (HTTP 404 / no such file)."""


class Transient(Exception):
    """Retryable failure (connection reset, timeout, 5xx, short read)."""


class Aborted(Exception):
    """Another worker failed; stop this download."""


# ------------------------------------------------------------------------------------- verification
def check_shard(path: Path, expect_bytes: int | None = None) -> int:
    """Return the token count of a valid shard; raise ValueError saying what is wrong otherwise."""
    size = path.stat().st_size
    if expect_bytes is not None and size != expect_bytes:
        raise ValueError(f"size {size} bytes, manifest says {expect_bytes}")
    if size < HEADER_BYTES:
        raise ValueError(f"size {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        magic, version, n = struct.unpack("<3i", f.read(12))
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic}, expected {MAGIC}")
    if version != VERSION:
        raise ValueError(f"version {version}, expected {VERSION}")
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise ValueError(f"size {size} bytes, expected {HEADER_BYTES + 2 * max(n, 0)} for the header's {n} tokens")
    return n


def check_tokenizer(path: Path, expect_bytes: int | None = None) -> int:
    """Non-empty (and size == manifest when known); a .model must load in sentencepiece when available."""
    size = path.stat().st_size
    if size == 0 or (expect_bytes is not None and size != expect_bytes):
        raise ValueError(f"size {size} bytes, expected {expect_bytes if expect_bytes is not None else '> 0'}")
    if path.name.endswith(".model"):
        try:
            import sentencepiece as spm
        except ImportError:
            return 0
        try:
            return spm.SentencePieceProcessor(model_proto=path.read_bytes()).get_piece_size()
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise ValueError(f"not a loadable SentencePiece model ({e})") from None
    return 0


@dataclass
class Item:
    kind: str  # train | val | tokenizer
    remote: str  # path under the base URL
    local: Path
    expect_bytes: int | None = None

    @property
    def name(self) -> str:
        return self.local.name

    def check(self, path: Path) -> int:
        return (check_tokenizer if self.kind == "tokenizer" else check_shard)(path, self.expect_bytes)


# ------------------------------------------------------------------------------------------ network
class Downloader:
    def __init__(self, base: str, retries: int, backoff: float, timeout: float, token: str | None, log,
                 probe_timeout: float = 5.0):
        self.base, self.retries, self.backoff, self.timeout = base.rstrip("/"), retries, backoff, timeout
        self.token, self.log = token, log
        self.abort = threading.Event()
        self.probe_timeout = probe_timeout
        # Until the host has answered once, "cannot reach it" means offline (fail fast), not a blip worth retrying.
        self.reached = urllib.parse.urlsplit(self.base).scheme not in ("http", "https")

    def url(self, remote: str) -> str:
        return f"{self.base}/{urllib.parse.quote(remote)}"

    def _open(self, url: str):
        req = urllib.request.Request(url, headers={"User-Agent": "parameter-golf-downloader/1"})
        if self.token:  # not forwarded on redirects (the CDN's signed URLs reject extra auth)
            req.add_unredirected_header("Authorization", f"Bearer {self.token}")
        timeout = self.timeout if self.reached else min(self.timeout, self.probe_timeout)
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError:
            self.reached = True  # an HTTP error status is an answer
            raise
        self.reached = True
        return resp

    def unreachable(self, e: Exception) -> str | None:
        """Why the host could not be reached at all (DNS, refused, no route, no answer), or None."""
        if isinstance(e, urllib.error.HTTPError):
            return None
        r = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(r, socket.gaierror):
            return f"DNS lookup failed ({r.strerror or r})"
        if isinstance(r, TimeoutError):
            return f"no answer within {min(self.timeout, self.probe_timeout):g}s (--probe-timeout)"
        if isinstance(r, OSError) and r.errno in UNREACHABLE_ERRNOS:
            return r.strerror or str(r)
        return None

    def offline_error(self, url: str, why: str) -> "DownloadError":
        host = urllib.parse.urlsplit(self.base).hostname or self.base
        proxy = urllib.request.getproxies().get(urllib.parse.urlsplit(self.base).scheme)
        via = f" through proxy {proxy}" if proxy and not urllib.request.proxy_bypass(host) else ""
        return DownloadError(f"cannot reach {host}{via}: {why} (fetching {url}); downloading needs network access "
                             f"to {host}; {OFFLINE_HINT}")

    @staticmethod
    def _classify(e: Exception, url: str) -> Exception:
        """Map a urllib/http/socket error to Missing, DownloadError (permanent) or Transient."""
        if isinstance(e, urllib.error.HTTPError):
            e.close()
            if e.code in (404, 410):
                return Missing(f"{url}: not found (HTTP {e.code})")
            if e.code == 429 or e.code >= 500:
                return Transient(f"HTTP {e.code} {e.reason}")
            hint = " (wrong MATCHED_FINEWEB_REPO_ID, or a private repo without HF_TOKEN?)" if e.code in (401, 403) else ""
            return DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}")
        if isinstance(e, urllib.error.URLError):
            r = e.reason
            if isinstance(r, OSError) and r.errno in (errno.ENOENT, errno.ENOTDIR):  # file:// URL
                return Missing(f"{url}: not found ({r.strerror})")
            if isinstance(r, str) and "not on local host" in r:
                return DownloadError(f"{url}: {r}")
            return Transient(f"{type(r).__name__}: {r}")
        return Transient(f"{type(e).__name__}: {e}")

    def _retrying(self, what: str, url: str, attempt_fn):
        for attempt in range(self.retries + 1):
            try:
                return attempt_fn()
            except NETWORK_ERRORS as e:
                why = None if self.reached else self.unreachable(e)
                if why:
                    raise self.offline_error(url, why) from None
                err = self._classify(e, url)
            except Transient as e:
                err = e
            if not isinstance(err, Transient):
                raise err
            if attempt == self.retries:
                raise DownloadError(f"{what}: {url} failed after {self.retries + 1} attempts: {err}")
            delay = min(self.backoff * 2 ** attempt, 60.0)
            self.log(f"retry {attempt + 1}/{self.retries} {what} in {delay:.1f}s: {err}")
            if self.abort.wait(delay):
                raise Aborted()

    def get_json(self, remote: str) -> dict | None:
        """Fetch a small optional JSON file; None when it does not exist."""
        url = self.url(remote)

        def once():
            with self._open(url) as r:
                return r.read()
        try:
            raw = self._retrying(remote, url, once)
        except Missing:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise DownloadError(f"{url}: invalid JSON ({e})") from None

    def fetch(self, item: Item) -> int:
        """Download item to <name>.part, verify, rename. Returns bytes written. Never leaves .part behind."""
        url, part = self.url(item.remote), item.local.with_name(item.name + ".part")

        def once() -> int:
            try:
                with self._open(url) as resp, _open_write(part) as f:
                    cl = resp.headers.get("Content-Length")
                    clen = int(cl) if cl and cl.strip().isdigit() else None
                    if clen is not None and item.expect_bytes is not None and clen != item.expect_bytes:
                        raise DownloadError(f"remote {item.name} ({url}) is {clen} bytes, manifest says {item.expect_bytes}")
                    n = 0
                    while chunk := resp.read(CHUNK):
                        if self.abort.is_set():
                            raise Aborted()
                        try:
                            f.write(chunk)
                        except OSError as e:  # disk full etc.: not a network problem, do not retry
                            raise DownloadError(f"writing {part}: {e}") from None
                        n += len(chunk)
                    if clen is not None and n != clen:
                        raise Transient(f"short read: got {n} of {clen} bytes (Content-Length)")
                try:
                    item.check(part)
                except ValueError as e:  # a complete transfer of a bad file: retrying will not help
                    raise DownloadError(f"remote {item.kind} file {item.name} is corrupt ({url}): {e}") from None
                os.replace(part, item.local)
                return n
            finally:
                part.unlink(missing_ok=True)

        return self._retrying(item.name, url, once)


def _open_write(path: Path):
    try:
        return open(path, "wb")
    except OSError as e:
        raise DownloadError(f"cannot write {path}: {e}") from None


def make_dir(d: Path) -> None:
    """mkdir -p with a clear error naming the path that is in the way."""
    for anc in (d, *d.parents):
        if anc.exists() or anc.is_symlink():
            if not anc.is_dir():
                raise DownloadError(f"cannot create folder {d}: {anc} is a file, expected a folder (check --out-dir)")
            break
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create folder {d}: {e.strerror or e} (check --out-dir)") from None


# ---------------------------------------------------------------------------------------------- plan
def variant_vocab(variant: str) -> tuple[int, str]:
    m = re.fullmatch(r"sp(\d+)(_\w+)?", variant)
    if not m:
        raise DownloadError(f"unsupported variant {variant!r}: expected sp<VOCAB>, e.g. sp1024, sp4096, sp8192")
    return int(m.group(1)), m.group(2) or ""


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


@dataclass
class Stats:
    downloaded: int = 0
    redownloaded: int = 0
    skipped: int = 0
    bytes_downloaded: int = 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--variant", default="sp1024", help="sp1024 (default repo), sp4096 / sp8192 (kevclark mirror)")
    ap.add_argument("--train-shards", type=int, default=80, help="number of train shards (~200 MB each)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--base-url", default=None, help="override the download base (http(s):// or file://)")
    ap.add_argument("--workers", type=int, default=4, help="parallel train-shard downloads")
    ap.add_argument("--retries", type=int, default=5)
    ap.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds (doubles, max 60)")
    ap.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    ap.add_argument("--probe-timeout", type=float, default=5.0,
                    help="seconds to wait for the host's first answer; none (or no DNS, refused) = offline error")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (DownloadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    lock = threading.Lock()

    def log(msg: str) -> None:
        with lock:
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()

    if args.train_shards < 0 or args.workers < 1 or args.retries < 0 or args.timeout <= 0 or args.probe_timeout <= 0:
        raise DownloadError("--train-shards must be >= 0, --workers >= 1, --retries >= 0, --timeout and "
                            "--probe-timeout > 0")
    vocab, suffix = variant_vocab(args.variant)
    repo = os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO)
    prefix = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
    revision = os.environ.get("MATCHED_FINEWEB_REVISION", "main")
    base = args.base_url or f"https://huggingface.co/datasets/{repo}/resolve/{revision}"
    token = os.environ.get("HF_TOKEN") if not args.base_url else None
    dl = Downloader(base, args.retries, args.backoff, args.timeout, token, log, args.probe_timeout)
    dataset = f"fineweb10B_{args.variant}"
    remote_dir = join(prefix, "datasets", dataset)
    data_dir, tok_dir = args.out_dir / "datasets" / dataset, args.out_dir / "tokenizers"
    for d in (data_dir, tok_dir):
        make_dir(d)
    for stale in [*data_dir.glob("*.part"), *tok_dir.glob("*.part")]:  # left by a killed run
        stale.unlink()
        log(f"removed leftover {stale}")
    log(f"variant:{args.variant} source:{base}/{remote_dir} out:{data_dir}")

    # Optional manifests: the per-variant one gives names+sizes, the export's global one gives counts.
    sizes: dict[str, int | None] = {}
    n_val = n_train_max = None
    tok_paths = [join(prefix, "tokenizers", f"fineweb_{vocab}_bpe{suffix}.{ext}") for ext in ("model", "vocab")]
    vm = dl.get_json(join(remote_dir, "manifest.json"))
    if vm is not None:
        try:
            sizes = {f["name"]: (int(f["bytes"]) if f.get("bytes") is not None else None) for f in vm["files"]}
        except (KeyError, TypeError, ValueError) as e:
            raise DownloadError(f"{dl.url(join(remote_dir, 'manifest.json'))}: expected "
                                f'{{"files": [{{"name": ..., "bytes": ...}}]}} ({e!r})') from None
        n_val = sum(1 for k in sizes if re.fullmatch(r"fineweb_val_\d{6}\.bin", k)) or None  # none listed: probe
        n_train_max = sum(1 for k in sizes if re.fullmatch(r"fineweb_train_\d{6}\.bin", k))
        log(f"manifest: {len(sizes)} files listed in {dataset}/manifest.json")
    gm = dl.get_json(join(prefix, "manifest.json"))
    gm = gm if isinstance(gm, dict) else {}
    entry = next((d for d in gm.get("datasets", []) if isinstance(d, dict) and d.get("name") == dataset), None)
    if entry is not None:
        stats = entry.get("stats") or {}
        n_val = n_val if n_val is not None else stats.get("files_val")
        n_train_max = n_train_max if n_train_max is not None else stats.get("files_train")
        tok = next((t for t in gm.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
        if tok and any(tok.get(k) for k in ("model_path", "vocab_path")):
            tok_paths = [join(prefix, tok[k]) for k in ("model_path", "vocab_path") if tok.get(k)]
        log(f"manifest: {dataset} files_train:{stats.get('files_train')} files_val:{stats.get('files_val')}")
    if n_train_max is not None and args.train_shards > int(n_train_max):
        raise DownloadError(f"{args.variant} has only {n_train_max} train shards on {base}, requested {args.train_shards}")

    def shard(kind: str, i: int) -> Item:
        name = f"fineweb_{kind}_{i:06d}.bin"
        return Item(kind, join(remote_dir, name), data_dir / name, sizes.get(name))

    train = [shard("train", i) for i in range(args.train_shards)]
    toks = [Item("tokenizer", p, tok_dir / p.rsplit("/", 1)[-1], sizes.get(p.rsplit("/", 1)[-1])) for p in tok_paths]

    def valid(item: Item) -> tuple[int | None, str]:
        if not item.local.exists():
            return None, "missing"
        try:
            return item.check(item.local), ""
        except (ValueError, OSError) as e:
            return None, str(e)

    # Disk check against what still has to come down (estimate when no manifest sizes).
    todo = [it for it in train if valid(it)[0] is None]
    val_todo = n_val != 0 and valid(shard("val", 0))[0] is None
    need = sum(it.expect_bytes or SHARD_BYTES_EST for it in todo) + 130_000_000 * val_todo
    free = shutil.disk_usage(data_dir).free
    log(f"plan: train_shards:{args.train_shards} to_download:{len(todo)} need~{need / 1e9:.1f}GB free:{free / 1e9:.1f}GB")
    if need > free:
        log(f"warning: ~{need / 1e9:.1f} GB needed but only {free / 1e9:.1f} GB free in {data_dir}")

    st, tokens = Stats(), {"train": 0, "val": 0}
    counts = {"train": 0, "val": 0}

    def ensure(item: Item) -> None:
        n, why = valid(item)
        if n is not None:
            with lock:
                st.skipped += 1
                if item.kind != "tokenizer":
                    tokens[item.kind] += n
                    counts[item.kind] += 1
            log(f"skip {item.name}: present and verified" + (f" ({n} tokens)" if item.kind != "tokenizer" else ""))
            return
        redo = why != "missing"
        if redo:
            log(f"re-download {item.name}: local file invalid ({why})")
        t0 = time.time()
        nbytes = dl.fetch(item)
        n = item.check(item.local)
        dt = max(time.time() - t0, 1e-9)
        with lock:
            st.redownloaded += redo
            st.downloaded += not redo
            st.bytes_downloaded += nbytes
            if item.kind != "tokenizer":
                tokens[item.kind] += n
                counts[item.kind] += 1
        log(f"got {item.name}: {nbytes / 1e6:.1f} MB in {dt:.1f}s ({nbytes / 1e6 / dt:.1f} MB/s)")

    # Val: all shards. Known count from a manifest, otherwise probe 0, 1, ... until one is missing.
    i = 0
    while n_val is None or i < int(n_val):
        try:
            ensure(shard("val", i))
        except Missing as e:
            if n_val is not None or i == 0:
                hint = f"; {MIRROR_HINT}" if args.variant != "sp1024" and repo == DEFAULT_REPO and not args.base_url else ""
                raise DownloadError(f"validation shard fineweb_val_{i:06d}.bin missing: {e}{hint}") from None
            break
        i += 1

    for item in toks:
        try:
            ensure(item)
        except Missing as e:
            raise DownloadError(f"tokenizer file {item.name} missing: {e}") from None

    # Train shards in parallel; the first failure stops the others (their .part files are removed).
    pool = ThreadPoolExecutor(max_workers=args.workers)
    try:
        futs = [pool.submit(ensure, it) for it in train]
        wait(futs, return_when=FIRST_EXCEPTION)
        if any(f.done() and not f.cancelled() and f.exception() for f in futs):
            dl.abort.set()
            pool.shutdown(wait=True, cancel_futures=True)
            errs = [f.exception() for f in futs if not f.cancelled() and f.exception()]
            err = next((e for e in errs if not isinstance(e, Aborted)), errs[0])
            if isinstance(err, Missing):
                raise DownloadError(f"train shard missing: {err}; the remote may hold fewer than "
                                    f"{args.train_shards} train shards (use a smaller --train-shards)") from None
            raise err
    except BaseException:  # also Ctrl-C: stop the workers (they delete their .part files) before leaving
        dl.abort.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    files = st.downloaded + st.redownloaded + st.skipped
    on_disk = sum(p.stat().st_size for p in [*data_dir.glob("fineweb_*.bin"), *(t.local for t in toks)])
    for t in toks:
        if t.name.endswith(".model"):
            v = check_tokenizer(t.local)
            if v and v != vocab:
                log(f"warning: {t.name} has vocab {v}, variant {args.variant} implies {vocab}")
    log(f"summary: variant:{args.variant} files:{files} downloaded:{st.downloaded} redownloaded:{st.redownloaded} "
        f"skipped:{st.skipped} bytes_downloaded:{st.bytes_downloaded} bytes_on_disk:{on_disk} "
        f"train_shards:{counts['train']} train_tokens:{tokens['train']} val_shards:{counts['val']} "
        f"val_tokens:{tokens['val']} dir:{data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
