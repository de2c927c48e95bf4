#!/usr/bin/env python3
"""The run contract between train_gpt.py and the tools, in one place (stdlib only, no torch).

- log lines: `event:<name> key:value ...` (train_gpt.Logger) -> parse_line / parse_events / read_events
- summary.json: SUMMARY_FIELDS / SUMMARY_OPTIONAL (field -> (types, nullable)) -> validate_summary
- atomic_write_bytes / atomic_write_text: temp file in the same folder, fsync, os.replace
- env_value: a TOML/JSON value -> the env string train_gpt's parser reads back as the same value
- KNOWN_ENV: every env name train_gpt.py reads (generated: `python3 tools/contract.py --regenerate`)

docs/FORMATS.md describes the same contract for people; tests/test_contract.py keeps both in step
with what a real smoke run writes.
"""
from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

BYTES_LIMIT = 16_000_000
TRAIN_LOG, SUMMARY, ARTIFACT, CODE = "train.log", "summary.json", "final_model.ptz", "train_gpt.py"  # a run dir's files

# ------------------------------------------------------------------------------------- log lines
# Logger.fmt writes bools as 1/0, floats with 6 decimals (%.6g below 1e-4, %.1f from 1e5) and every other value
# with spaces/newlines turned into "_", so tokens split on whitespace. The one exception: the failure lines
# (`event:error kind:<Type> msg:<text>`, `event:interrupted ...`) are written raw, so `msg` is always the last key
# and its value runs to the end of the line.
EVENT = "event:"
REST_OF_LINE = "msg"
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I)


def coerce(text: str) -> Any:
    """'12' -> 12, '1.5e-08' / 'nan' -> float, anything else unchanged (bools arrive as the ints 1/0: see as_bool)."""
    if _INT.fullmatch(text):
        return int(text)
    return float(text) if _FLOAT.fullmatch(text) else text


def as_bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "0", "false", "no"):
        return v.lower() in ("1", "true", "yes")
    return None


def parse_line(line: str, coerce_values: bool = False, strict: bool = False) -> tuple[str, dict[str, Any]] | None:
    """'event:train step:3 loss:2.5' -> ('train', {'step': '3', 'loss': '2.5'}) (numbers with coerce_values);
    None for a line without an event. Text before the event token (a torchrun '[rank0]:' prefix) is skipped and
    tokens that are not key:value are ignored, unless strict: then the line must start with the event and every
    token be key:value (ValueError otherwise). Values keep their colons (path:/a/b:c)."""
    text = line.strip()
    toks = list(re.finditer(r"\S+", text))
    start = next((i for i, m in enumerate(toks) if m.group().startswith(EVENT) and len(m.group()) > len(EVENT)), None)
    if start is None or (strict and start != 0):
        return None
    fields: dict[str, Any] = {}
    for m in toks[start + 1:]:
        key, sep, value = m.group().partition(":")
        if not (sep and key):
            if strict:
                raise ValueError(f"not key:value: {m.group()!r} in {line!r}")
            continue
        if key == REST_OF_LINE:
            fields[key] = text[m.start() + len(key) + 1:].strip()
            break
        fields[key] = coerce(value) if coerce_values else value
    return toks[start].group()[len(EVENT):], fields


def parse_events(lines: Iterable[str], coerce_values: bool = False, strict: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Event lines -> {name: [fields, ...]} in log order (a str is split into lines)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for line in lines.splitlines() if isinstance(lines, str) else lines:
        ev = parse_line(line, coerce_values, strict)
        if ev is not None:
            out.setdefault(ev[0], []).append(ev[1])
    return out


def read_events(path: str | os.PathLike, coerce_values: bool = False, strict: bool = False) -> dict[str, list[dict[str, Any]]]:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return parse_events(f, coerce_values, strict)


def last_event(events: Mapping[str, list], name: str) -> dict[str, Any] | None:
    lst = events.get(name)
    return lst[-1] if lst else None

# ------------------------------------------------------------------------------------ summary.json
NUM = (int, float)
_S, _I, _B = (str,), (int,), (bool,)
# field -> (allowed types, nullable): every key of a training run's summary.json (train_gpt.run: the run's base
# facts, Trainer.train's stats, run_evals, the artifact). A number may be an int or a float.
SUMMARY_FIELDS: dict[str, tuple[tuple, bool]] = {
    "run_id": (_S, False), "seed": (_I, False), "code_sha256": (_S, False), "code_bytes": (_I, False),
    "config": ((dict,), False), "world_size": (_I, False), "device": (_S, False), "torch_version": (_S, False),
    "cuda_version": (_S, True), "max_wallclock_seconds": (NUM, True), "max_eval_seconds": (NUM, True),
    "bytes_limit": (_I, False),
    "steps": (_I, False), "train_seconds": (NUM, False), "ms_per_step": (NUM, False), "tokens_per_s": (NUM, False),
    "peak_mem_gib": (NUM, True), "stop_reason": (_S, False),
    "hessian_seconds": (NUM, False), "train_plus_hessian_seconds": (NUM, False),
    "prequant_val_loss": (NUM, False), "prequant_val_bpb": (NUM, False),
    "eval_warmup_seconds": (NUM, False), "quant_val_loss": (NUM, False), "quant_val_bpb": (NUM, False),
    "val_tokens": (_I, False), "val_bytes": (_I, False),
    "final_val_loss": (NUM, False), "final_val_bpb": (NUM, False), "final_metric": (_S, False),
    "sliding_val_loss": (NUM, True), "sliding_val_bpb": (NUM, True), "ttt_val_loss": (NUM, True), "ttt_val_bpb": (NUM, True),
    "eval_seconds": (NUM, False), "valid_score": (_B, False),
    "bytes_model": (_I, False), "bytes_code": (_I, False), "bytes_total": (_I, False), "artifact_sha256": (_S, False),
    "compressor": (_S, False), "quant_seconds": (NUM, False),
    "train_time_ok": (_B, False), "eval_time_ok": (_B, False), "size_ok": (_B, False),
}
# Keys only some runs write: sliding_seconds (sliding eval ran), ttt_seconds (TTT ran), ttt_docs / ttt_phases
# (TTT_MODE=phased), mode / artifact (--eval-only), quant_plain_val_* (the roundtrip without the n-gram tilt; runs since
# 2026-12-04).
SUMMARY_OPTIONAL: dict[str, tuple[tuple, bool]] = {
    "sliding_seconds": (NUM, False), "ttt_seconds": (NUM, False), "ttt_docs": (_I, False), "ttt_phases": ((list,), False),
    "mode": (_S, False), "artifact": (_S, False), "quant_plain_val_loss": (NUM, False), "quant_plain_val_bpb": (NUM, False),
}
# --eval-only trains nothing and writes no new code file: these keys are absent from its summary (mode: eval_only).
EVAL_ONLY_ABSENT = ("steps", "train_seconds", "ms_per_step", "tokens_per_s", "peak_mem_gib", "stop_reason",
                    "hessian_seconds", "train_plus_hessian_seconds", "prequant_val_loss", "prequant_val_bpb",
                    "bytes_code", "compressor", "quant_seconds", "train_time_ok")
FINAL_METRICS = {"roundtrip": "quant", "sliding": "sliding", "ttt": "ttt"}  # final_metric -> prefix of its *_val_* keys


def type_ok(value: Any, types: tuple, nullable: bool) -> bool:
    if value is None:
        return nullable
    if isinstance(value, bool):  # bool is an int subclass: never accept it as a number
        return bool in types
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, types)


def type_name(types: tuple, nullable: bool) -> str:
    names = {NUM: "number", _S: "str", _I: "int", _B: "bool", (dict,): "object", (list,): "list"}
    return names.get(types, "/".join(t.__name__ for t in types)) + (" or null" if nullable else "")


def check_fields(obj: Mapping, spec: Mapping[str, tuple[tuple, bool]], where: str, required: Iterable[str] | None = None) -> list[str]:
    """Problems of obj against spec: a missing required key (default: all of spec), a present key of the wrong type."""
    required = set(spec if required is None else required)
    problems = []
    for key, (types, nullable) in spec.items():
        if key not in obj:
            if key in required:
                problems.append(f"{where}: missing field {key!r}")
        elif not type_ok(obj[key], types, nullable):
            problems.append(f"{where}: field {key!r} = {obj[key]!r} is not {type_name(types, nullable)}")
    return problems


def validate_summary(obj: Any, required: Iterable[str] | None = None, where: str = SUMMARY) -> list[str]:
    """Problems of a parsed summary.json (empty = valid). required: the keys the caller needs (default: all keys
    of SUMMARY_FIELDS, less EVAL_ONLY_ABSENT for an --eval-only summary); every known key present is type-checked."""
    if not isinstance(obj, dict):
        return [f"{where}: not a JSON object"]
    if required is None:
        required = set(SUMMARY_FIELDS) - (set(EVAL_ONLY_ABSENT) if obj.get("mode") == "eval_only" else set())
    problems = check_fields(obj, {**SUMMARY_FIELDS, **SUMMARY_OPTIONAL}, where, required)
    fm = obj.get("final_metric")
    if isinstance(fm, str) and fm not in FINAL_METRICS:
        problems.append(f"{where}: final_metric {fm!r} is not one of {sorted(FINAL_METRICS)}")
    return problems

# ----------------------------------------------------------------------------------- atomic write
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Readers see the old file or the whole new one, never a part; the temp file never outlives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))  # bytes: no newline translation

# ------------------------------------------------------------------------------------ env values

def env_value(v: Any) -> str:
    """TOML/JSON value -> env string that train_gpt's _parse reads back as the same value: bools 1/0, ints as is,
    floats by repr (shortest round-trip; non-finite ones are refused, as train_gpt refuses them), strings as is,
    lists comma-joined (VE_LAYERS, TTT_TARGETS), None "". ValueError / TypeError otherwise."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"non-finite number {v!r}")
        return repr(v)
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)) and not any(isinstance(x, (list, tuple, dict)) for x in v):
        return ",".join(env_value(x) for x in v)
    raise TypeError(f"env values must be strings, numbers, booleans or flat lists of them, got {type(v).__name__}")

# ----------------------------------------------------------------------------------- KNOWN_ENV
BEGIN, END = "# --- KNOWN_ENV: generated by `python3 tools/contract.py --regenerate`; do not edit ---", "# --- end KNOWN_ENV ---"
# --- KNOWN_ENV: generated by `python3 tools/contract.py --regenerate`; do not edit ---
KNOWN_ENV = frozenset("""
ADAM_EPS ADAM_WD ASYM_LOGIT_RESCALE ATTN_BACKEND ATTN_CLIP_SIGMAS ATTN_GATE ATTN_OUT_GATE AWQ_LITE_BITS
AWQ_LITE_ENABLED AWQ_LITE_GROUP_SIZE AWQ_LITE_GROUP_TOP_K BETA1 BETA2 BIGRAM_BUCKETS BIGRAM_DIM BIGRAM_HASH
BIGRAM_VOCAB_SIZE BROTLI_LGWIN CASEOPS CASEOPS_ENABLED CE_KERNEL COMPILE COMPRESSOR DATA_PATH DOC_ATTENTION
EMA_DECAY EMA_ENABLED EMA_START_FRAC EMBED_BITS EMBED_CLIP_SIGMAS EMBED_LR EMBED_WD ENABLE_LOOPING_AT
EVAL_BATCH_SEQS EVAL_DOC_ATTENTION EVAL_SEQ_LEN EVAL_STRIDE FP16_TENSORS FUSED_GRADS GATED_ATTENTION
GATED_ATTN_QUANT_GATE GATE_ATTN_OUT GATE_ATTN_SRC GATE_QUANT_INT8 GATE_WIDTH GATE_WINDOW GLOBAL_TTT_BATCH_SEQS
GLOBAL_TTT_CHUNK_TOKENS GLOBAL_TTT_EPOCHS GLOBAL_TTT_GRAD_CLIP GLOBAL_TTT_LR GLOBAL_TTT_MOMENTUM GPTQ_ACT_ORDER
GPTQ_BLOCK_SIZE GPTQ_CALIBRATION_BATCHES GPTQ_DAMP GPTQ_RESERVE_SECONDS GRAD_ACCUM_STEPS GRAD_CLIP_NORM GROW_AT_FRAC
GROW_LAYERS_FROM HEAD_DIM HEAD_LR INT8_CLIP_PERCENTILE INT8_SCALE_FLOOR ITERATIONS LEAKY_SLOPE LN_SCALE
LN_SCALE_MODE LOCAL_RANK LOGIT_SOFTCAP LOOP_END LOOP_LORA_RANK LOOP_START LQER_ASYM_GROUP LQER_ENABLED LQER_GROUP
LQER_RANK LQER_TOP_K LZMA_EXTREME LZMA_PRESET MATRIX_BITS MATRIX_CLIP_SIGMAS MATRIX_LR MAX_EVAL_SECONDS
MAX_WALLCLOCK_SECONDS MIN_LR MLP_CLIP_SIGMAS MLP_KERNEL MLP_MULT MODEL_DIM MUON_BACKEND_STEPS MUON_MOMENTUM
MUON_MOMENTUM_WARMUP_START MUON_MOMENTUM_WARMUP_STEPS MUON_NS_COEFFS MUON_ROW_NORMALIZE MUON_WD MUON_WD_SCHEDULE
NGRAM_TILT_ENABLED NGRAM_TOKEN_BOOST NGRAM_TOKEN_ORDER NGRAM_TOKEN_THRESHOLD NUM_HEADS NUM_KV_HEADS NUM_LAYERS
NUM_LOOPS PARALLEL_MODE PARALLEL_RESID_INIT PARALLEL_SKIP PARALLEL_START_LAYER PARTIAL_ROPE_DIMS
PHASED_TTT_NUM_PHASES PHASED_TTT_PREFIX_DOCS PREFETCH_BATCHES PRESET PROJ_INIT QAT QAT_START_FRAC QK_GAIN_INIT
QK_GAIN_LEARNED QUANT RANK ROPE_BASE ROPE_DIMS RUN_DIR RUN_ID SCALAR_LR SEED SEQ_CHANGE_WARMUP_STEPS SHARED_HEAD_DIM
SKIP_GATES_ENABLED SLIDING_EVAL SLIDING_WINDOW_ENABLED SMEAR_BOS_FIX SMEAR_GATE SMEAR_GATE_BOS_FIX
SMEAR_GATE_ENABLED SMEAR_GATE_MODE SMEAR_GATE_NORM SMEAR_GATE_WIDTH SPARSE_ATTN_GATE SPARSE_ATTN_GATE_ENABLED
SPARSE_ATTN_GATE_SCALE SWA_ENABLED SWA_EVERY SWA_START_LR TIED_EMBED_INIT_STD TIED_EMBED_LR TIE_EMBEDDINGS
TOKENIZER_PATH TRAIN_BATCH_TOKENS TRAIN_LOG_EVERY TRAIN_SEQ_LEN TRAIN_SEQ_SCHEDULE TTT_BATCH_SIZE TTT_BETA1
TTT_BETA2 TTT_CHUNK_SCHEDULE TTT_CHUNK_SIZE TTT_CHUNK_TOKENS TTT_COMPILE TTT_DOCS_PER_BATCH TTT_ENABLED TTT_EPOCHS
TTT_EVAL_SEQ_LEN TTT_GRAD_STEPS TTT_LOCAL_LR_MULT TTT_LORA_ALPHA TTT_LORA_LR TTT_LORA_RANK TTT_LR TTT_MASK TTT_MODE
TTT_ROWS_PER_FORWARD TTT_TARGETS TTT_WARM_START_A TTT_WEIGHT_DECAY UNET_SKIPS VALUE_RESIDUAL VAL_BYTES
VAL_LOSS_EVERY VAL_MAX_TOKENS VE128_DIM VE128_LAYERS VE_DIM VE_ENABLED VE_GATE VE_GATE_WIDTH VE_LAYERS VOCAB_SIZE
WARMDOWN_FRAC WARMDOWN_ITERS WARMDOWN_SHAPE WARMUP_STEPS WEIGHT_DECAY_ADAM WEIGHT_DECAY_MUON WINDOW_PATTERN
WINDOW_SHORT WORLD_SIZE XSA_GATE XSA_GATE_INIT XSA_LAST_N XSA_LAYERS
""".split())
# --- end KNOWN_ENV ---


def known_env_names(tg) -> list[str]:
    """Env names the train_gpt module `tg` reads: every Field's name and aliases, plus the literal
    os.environ / os.getenv reads in its source (WORLD_SIZE, RANK, LOCAL_RANK)."""
    src = Path(tg.__file__).read_text(encoding="utf-8")
    direct = re.findall(r"""os\.(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']""", src)
    legacy = set(getattr(tg, "LEGACY_GATE_FLAGS", ()))  # the old gate switches, still read (they pick ATTN_GATE)
    return sorted({f.name for f in tg.FIELDS} | {a for f in tg.FIELDS for a in f.aliases} | legacy | set(direct))


def known_env_block(tg, width: int = 116) -> str:
    lines, cur = [], ""
    for n in known_env_names(tg):
        if cur and len(cur) + 1 + len(n) > width:
            lines.append(cur)
            cur = n
        else:
            cur = f"{cur} {n}" if cur else n
    body = "\n".join(lines + [cur])
    return f'{BEGIN}\nKNOWN_ENV = frozenset("""\n{body}\n""".split())\n{END}'


def regenerate(tg, path: Path = Path(__file__)) -> bool:
    """Rewrite this file's KNOWN_ENV block from `tg`; True when it changed."""
    text = path.read_text(encoding="utf-8")
    i, j = text.rindex("\n" + BEGIN) + 1, text.rindex("\n" + END) + 1 + len(END)  # the markers' own lines, not BEGIN = ...
    new = text[:i] + known_env_block(tg) + text[j:]
    if new != text:
        atomic_write_text(path, new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--regenerate"]:
        print("usage: python3 tools/contract.py --regenerate   (rewrites KNOWN_ENV from train_gpt.py; needs torch)", file=sys.stderr)
        return 0 if argv in (["-h"], ["--help"]) else 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_gpt  # the generator may need torch; this module never does
    print(f"{'updated' if regenerate(train_gpt) else 'unchanged'}: KNOWN_ENV in {Path(__file__).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
