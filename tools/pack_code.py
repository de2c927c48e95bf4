#!/usr/bin/env python3
"""Pack a readable train_gpt.py into a small self-extracting file for submission.

The code bytes count toward the 16,000,000-byte artifact, so the shipped (and counted)
train_gpt.py should be small. This tool

1. strips comments (ast.unparse drops them) and docstrings / bare string statements
   (unless --keep-docstrings), optionally re-indents with one space per level, and checks
   that the result parses to the same AST as the original minus docstrings;
2. compresses it with lzma (preset 9|extreme; xz and "alone" containers, a few lc/pb
   settings) and brotli (quality 11, if importable) and keeps the smallest (--codec);
3. base85-encodes the payload into a short wrapper:

       import lzma as _L,base64 as _B,linecache as _C
       _s=_L.decompress(_B.b85decode("...")).decode()
       _f="<train_gpt.py>"
       _C.cache[_f]=_C.cache[__file__]=(len(_s),None,_s.splitlines(True),_f)
       exec(compile(_s,_f,"exec"))

   The unpacked source is compiled under the pseudo filename _f and registered in
   linecache.cache, so inspect.getsource works for functions defined in it (@triton.jit
   kernels, torch.compile): functions find their source through co_filename (= _f).
   Classes find theirs through their module's __file__ (inspect.getfile), so the same
   lines are also registered under the packed file's own path; linecache never re-reads an
   entry whose mtime is None (this only changes what linecache/inspect return for the
   packed path; open(__file__) and os.path.getsize(__file__) still see the packed bytes).
   It is exec'd in the module's own globals: __name__ stays "__main__" and __file__ stays
   the packed file's path (the script counts the bytes of __file__ as its code size, i.e.
   the packed file).

Usage
-----
    python tools/pack_code.py train_gpt.py -o build/train_gpt.py [--codec auto|lzma|brotli]
    python tools/pack_code.py --unpack build/train_gpt.py [-o readable.py]
    python tools/pack_code.py --verify train_gpt.py [--packed build/train_gpt.py]
           [--cmd 'PRESET=smoke {python} {file}'] [--timeout 1800]

--verify runs the smoke command twice, with the original and with the packed file, from the
original's folder, each time with RUN_DIR (env) = the same fresh path (the folder is moved
aside after each run, since the artifact may store the config incl. RUN_DIR), and passes when both exit 0, both
RUN_DIR/final_model.ptz have the same sha256, and the packed run's log reports
bytes_code == size of the packed file.  Exit status 0 = pass, 1 = fail.
"""
from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import lzma
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contract import TRAIN_LOG, atomic_write_text, last_event, read_events  # noqa: E402

try:
    import brotli  # type: ignore
except ImportError:  # pragma: no cover
    brotli = None

WRAPPER = (
    'import {mod} as _L,base64 as _B,linecache as _C\n'
    '_s=_L.decompress(_B.b85decode("{payload}")).decode()\n'
    '_f="<{name}>"\n'
    '_C.cache[_f]=_C.cache[__file__]=(len(_s),None,_s.splitlines(True),_f)\n'
    'exec(compile(_s,_f,"exec"))\n'
)
WRAPPER_RE = re.compile(
    r'\Aimport (lzma|brotli) as _L,base64 as _B,linecache as _C\n'
    r'_s=_L\.decompress\(_B\.b85decode\("([^"]*)"\)\)\.decode\(\)\n')
DEFAULT_VERIFY_CMD = "PRESET=smoke {python} {file}"


class PackError(Exception):
    pass


# ---------------------------------------------------------------------------- stripping
def _is_str_stmt(node: ast.AST) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


class _StripStrings(ast.NodeTransformer):
    """Drop docstrings and every other bare string statement (they have no effect)."""

    def generic_visit(self, node):
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if not isinstance(stmts, list) or not stmts or not isinstance(stmts[0], ast.stmt):
                continue
            kept = [s for s in stmts if not _is_str_stmt(s)]
            if len(kept) != len(stmts):
                if not kept and field != "orelse":
                    kept = [ast.Pass()]
                setattr(node, field, kept)
        return node


def _without_docstrings(tree: ast.AST) -> ast.AST:
    tree = _StripStrings().visit(tree)
    return ast.fix_missing_locations(tree)


def _reindent(src: str, width: int) -> str:
    """Re-indent ast.unparse output (4 spaces per level) to `width` spaces per level.

    Safe only when no string literal spans lines; the caller re-checks the AST.
    """
    out = []
    for line in src.splitlines():
        stripped = line.lstrip(" ")
        n = len(line) - len(stripped)
        out.append(" " * (width * (n // 4) + n % 4) + stripped)
    return "\n".join(out) + "\n"


def strip_source(src: str, keep_docstrings: bool = False, indent: int = 1) -> str:
    """Comment-free (and by default docstring-free) source with the same semantics."""
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise PackError(f"cannot parse the input: {e}") from None
    if not keep_docstrings:
        tree = _without_docstrings(tree)
    reference = ast.dump(tree)
    out = ast.unparse(tree) + "\n"
    if ast.dump(ast.parse(out)) != reference:
        raise PackError("ast.unparse round trip changed the program (please report)")
    if indent and indent != 4:
        candidate = _reindent(out, indent)
        try:
            if ast.dump(ast.parse(candidate)) == reference:
                out = candidate
        except SyntaxError:
            pass  # keep 4-space output
    return out


# ---------------------------------------------------------------------------- compression
def _lzma_candidates(data: bytes) -> list[bytes]:
    preset = 9 | lzma.PRESET_EXTREME
    outs = [lzma.compress(data, format=lzma.FORMAT_XZ, preset=preset, check=lzma.CHECK_NONE)]
    for lc in (1, 2, 3, 4):
        for pb in (0, 2):
            filt = [{"id": lzma.FILTER_LZMA1, "preset": preset, "lc": lc, "lp": 0, "pb": pb,
                     "nice_len": 273}]
            outs.append(lzma.compress(data, format=lzma.FORMAT_ALONE, filters=filt))
    for o in outs:  # every candidate must decode with plain lzma.decompress (FORMAT_AUTO)
        assert lzma.decompress(o) == data
    return outs


def compress(data: bytes, codec: str = "auto") -> tuple[str, bytes]:
    """Returns (module name used by the wrapper, compressed bytes): the smallest allowed."""
    cands: list[tuple[str, bytes]] = []
    if codec in ("auto", "lzma"):
        cands += [("lzma", c) for c in _lzma_candidates(data)]
    if codec in ("auto", "brotli"):
        if brotli is None:
            if codec == "brotli":
                raise PackError("--codec brotli: the brotli module is not installed")
        else:
            c = brotli.compress(data, quality=11, lgwin=24)
            assert brotli.decompress(c) == data
            cands.append(("brotli", c))
    if not cands:
        raise PackError(f"unknown codec {codec!r}")
    return min(cands, key=lambda mc: len(mc[1]))


def pack_source(src: str, codec: str = "auto", name: str = "train_gpt.py") -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        name = "packed.py"
    mod, payload = compress(src.encode("utf-8"), codec)
    text = WRAPPER.format(mod=mod, payload=base64.b85encode(payload).decode("ascii"), name=name)
    compile(text, "<wrapper>", "exec")
    if unpack_source(text) != src:
        raise PackError("packed payload does not round-trip")
    return text


def unpack_source(text: str) -> Optional[str]:
    """The embedded source of a file packed by this tool, or None if it is not one."""
    m = WRAPPER_RE.match(text)
    if not m:
        return None
    mod, payload = m.groups()
    raw = base64.b85decode(payload)
    if mod == "lzma":
        return lzma.decompress(raw).decode("utf-8")
    if brotli is None:
        raise PackError("this file is brotli-packed but brotli is not installed")
    return brotli.decompress(raw).decode("utf-8")


def pack_file(src_path: Path, out_path: Path, codec: str = "auto", keep_docstrings: bool = False,
              indent: int = 1, strip: bool = True, force: bool = True) -> dict:
    src_path, out_path = Path(src_path), Path(out_path)
    try:
        original = src_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PackError(f"{src_path} is not UTF-8 text (byte {e.start}): pack_code packs Python source") from None
    if not force and out_path.exists():
        raise PackError(f"{out_path} exists; pass --force to replace it (or choose another -o)")
    if unpack_source(original) is not None:
        raise PackError(f"{src_path} is already packed (use --unpack to get the source)")
    if src_path.resolve() == out_path.resolve():
        raise PackError("refusing to overwrite the input file; choose another -o")
    code = strip_source(original, keep_docstrings=keep_docstrings, indent=indent) if strip else original
    packed = pack_source(code, codec=codec, name=out_path.name)
    atomic_write_text(out_path, packed)
    info = dict(input=str(src_path), output=str(out_path),
                original_bytes=len(original.encode("utf-8")),
                stripped_bytes=len(code.encode("utf-8")),
                packed_bytes=out_path.stat().st_size,
                codec=WRAPPER_RE.match(packed).group(1))
    return info


# ---------------------------------------------------------------------------- verify
def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _log_bytes_code(run_dir: Path) -> Optional[int]:
    log = run_dir / TRAIN_LOG
    art = last_event(read_events(log, coerce_values=True), "artifact") if log.is_file() else None
    return art.get("bytes_code") if art and isinstance(art.get("bytes_code"), int) else None


def run_smoke(cmd_template: str, file: Path, run_dir: Path, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    cmd = cmd_template.format(python=shlex.quote(sys.executable), file=shlex.quote(str(file)))
    env = dict(os.environ, RUN_DIR=str(run_dir))
    return subprocess.run(cmd, shell=True, cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


def verify(original: Path, packed: Path, cmd_template: str = DEFAULT_VERIFY_CMD,
           timeout: float = 1800, workdir: Optional[Path] = None, progress=None) -> tuple[bool, list[str]]:
    """Run the smoke command with both files; returns (passed, report lines). `progress(line)` hears each step."""
    progress = progress or (lambda line: None)
    original, packed = Path(original).resolve(), Path(packed).resolve()
    cwd = original.parent
    report = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="pack_verify_", dir=workdir) as tmp:
        results = {}
        # Both runs use the same RUN_DIR path (the config, RUN_DIR included, may be stored in
        # the artifact); each run's folder is moved aside afterwards.
        run_path = Path(tmp) / "run"
        for label, f in (("original", original), ("packed", packed)):
            progress(f"[verify] smoke run with the {label} file ({f}) ...")
            t0 = time.time()
            try:
                proc = run_smoke(cmd_template, f, run_path, cwd, timeout)
            except subprocess.TimeoutExpired:
                report.append(f"{label}: timed out after {timeout:.0f} s")
                return False, report
            progress(f"[verify] {label}: exit {proc.returncode} after {time.time() - t0:.0f} s")
            rd = Path(tmp) / label
            if run_path.exists():
                os.rename(run_path, rd)
            art = rd / "final_model.ptz"
            results[label] = (proc, rd, art)
            report.append(f"{label}: exit {proc.returncode}, {f.stat().st_size} code bytes, "
                          f"artifact {'present' if art.is_file() else 'MISSING'}")
            if proc.returncode != 0:
                ok = False
                tail = (proc.stdout + proc.stderr)[-2000:]
                report.append(f"{label}: command failed; output tail:\n{tail}")
        if not ok:
            return False, report
        (_, rd_o, art_o), (_, rd_p, art_p) = results["original"], results["packed"]
        if not (art_o.is_file() and art_p.is_file()):
            return False, report + ["final_model.ptz missing"]
        h_o, h_p = _sha256(art_o), _sha256(art_p)
        same = h_o == h_p
        ok &= same
        report.append(f"artifact sha256 original {h_o[:16]}… packed {h_p[:16]}… -> {'same' if same else 'DIFFERENT'}")
        size = packed.stat().st_size
        logged = _log_bytes_code(rd_p)
        good = logged == size
        ok &= good
        report.append(f"packed log bytes_code {logged} vs packed file size {size} -> {'ok' if good else 'MISMATCH'}")
        logged_o = _log_bytes_code(rd_o)
        report.append(f"original log bytes_code {logged_o} (file {original.stat().st_size})")
    return ok, report


# ---------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="readable source (or packed file with --unpack)")
    p.add_argument("-o", "--output", help="packed output (default <input stem>.packed.py)")
    p.add_argument("--codec", choices=("auto", "lzma", "brotli"), default="auto")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--keep-docstrings", action="store_true", help="strip only comments")
    p.add_argument("--no-strip", action="store_true", help="compress the source as is")
    p.add_argument("--indent", type=int, default=1, help="spaces per indent level after stripping (default 1)")
    p.add_argument("--unpack", action="store_true", help="print/write the source embedded in a packed file")
    p.add_argument("--verify", action="store_true", help="pack (unless --packed) and run the smoke check")
    p.add_argument("--packed", help="with --verify: an existing packed file to compare")
    p.add_argument("--cmd", default=DEFAULT_VERIFY_CMD,
                   help="smoke command template; {python} and {file} are substituted, RUN_DIR is set "
                        f"(default {DEFAULT_VERIFY_CMD!r})")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per smoke run")
    args = p.parse_args(argv)
    if not args.input:
        p.error("input file required")
    inp = Path(args.input)
    try:
        if args.unpack:
            try:
                src = unpack_source(inp.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                src = None
            if src is None:
                raise PackError(f"{inp} is not a file packed by pack_code.py")
            if args.output:
                if not args.force and Path(args.output).exists():  # the same rule as packing
                    raise PackError(f"{args.output} exists; pass --force to replace it (or choose another -o)")
                atomic_write_text(Path(args.output), src)
            else:
                sys.stdout.write(src)
            return 0
        if args.verify:
            if args.packed:
                packed = Path(args.packed)
                tmpdir = None
            else:
                tmpdir = tempfile.TemporaryDirectory(prefix="pack_code_")
                packed = Path(args.output) if args.output else Path(tmpdir.name) / inp.name
                info = pack_file(inp, packed, codec=args.codec, keep_docstrings=args.keep_docstrings,
                                 indent=args.indent, strip=not args.no_strip, force=args.force or not args.output)
                print(f"packed {info['original_bytes']:,} -> {info['packed_bytes']:,} bytes ({info['codec']})")
            try:
                ok, report = verify(inp, packed, args.cmd, args.timeout,
                                    progress=lambda line: print(line, file=sys.stderr, flush=True))
            finally:
                if tmpdir is not None:
                    tmpdir.cleanup()
            print("\n".join(report))
            print("VERIFY PASS" if ok else "VERIFY FAIL")
            return 0 if ok else 1
        out = Path(args.output) if args.output else inp.with_name(inp.stem + ".packed.py")
        info = pack_file(inp, out, codec=args.codec, keep_docstrings=args.keep_docstrings,
                         indent=args.indent, strip=not args.no_strip, force=args.force)
        print(f"{info['input']}: {info['original_bytes']:,} bytes -> stripped {info['stripped_bytes']:,} "
              f"-> packed {info['packed_bytes']:,} bytes ({info['codec']}) -> {info['output']}")
        return 0
    except (PackError, OSError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
