"""CaseOps (data/caseops.py): the transform is lossless on random and adversarial strings, matches the spec's
examples, keeps ASCII letters lowercase; the byte sidecar adds up to the original UTF-8 bytes (on the 200 challenge
docs) and equals the LUT byte count where both apply; text_to_shards --caseops writes aligned sidecar shards; and
train_gpt scores val_bpb from the sidecar (CASEOPS=1 requires it; a length mismatch is a clear error)."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "data"))
import caseops as C  # noqa: E402

CASEOPS_TOK = SHARED / "data" / "tokenizers" / "caseops" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
PLAIN_TOK = SHARED / "data" / "tokenizers" / "fineweb_8192_bpe.model"
DOCS = SHARED / "data" / "text" / "fineweb_challenge_docs_200.jsonl"
needs_shared = pytest.mark.skipif(not (CASEOPS_TOK.exists() and DOCS.exists()),
                                  reason="../shared/data (CaseOps tokenizer, challenge docs) is absent")

ALPHABET = ["a", "b", "z", "A", "B", "Z", "Q", "é", "É", "ß", "İ", "ǅ", "0", "9", " ", "\n", "\t", "'", "-", "_", "😀",
            C.TITLE, C.ALLCAPS, C.CAPNEXT, C.ESC, "\ue000", "\ue005", "\x00", "\ufeff"]


def test_spec_examples_and_word_rules():
    T, A, N, E = C.TITLE, C.ALLCAPS, C.CAPNEXT, C.ESC
    assert C.encode("The NASA Launch") == f"{T}the {A}nasa {T}launch"
    assert C.encode("hello world") == "hello world"
    assert C.encode("I") == f"{T}i" and C.encode("A b") == f"{T}a b"  # one uppercase letter: TITLE, not ALLCAPS
    assert C.encode("McDonald") == f"{T}mc{N}donald" and C.encode("iPhone") == f"i{N}phone"
    assert C.encode("NASA2024ESA") == f"{A}nasa2024{A}esa"  # digits end a word
    assert C.encode("CAFÉ") == f"{A}caf\u00c9"  # non-ASCII letters are untouched and end the ASCII run
    assert C.encode(f"x{T}y{E}") == f"x{E}{T}y{E}{E}"  # operators already in the text are escaped


@pytest.mark.parametrize("seed", range(300))
def test_roundtrip_random_strings(seed):
    rng = random.Random(seed)
    s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60)))
    e = C.encode(s)
    assert C.decode(e) == s
    # ASCII letters of the transformed text are all lowercase; operators appear only as the transform put them
    assert not any("A" <= c <= "Z" for c in e)


def test_roundtrip_adversarial_strings():
    cases = ["", C.ESC, C.ESC * 5, C.TITLE + "a", C.ALLCAPS, C.CAPNEXT + "Z", "A" * 1000, "aA" * 500, "Aa" * 500,
             "".join(chr(c) for c in range(0x20, 0x7F)), "\ue001\ue002\ue003\ue004" * 3, "ABC\ue004DEF", "x\ue002yy"]
    for s in cases:
        assert C.decode(C.encode(s)) == s, repr(s)


def test_decode_rejects_malformed_operators():
    for bad in (C.ESC, C.TITLE, C.TITLE + "A", C.CAPNEXT + "1", C.ALLCAPS + "a", C.ALLCAPS + "1"):
        with pytest.raises(C.CaseOpsError):
            C.decode(bad)


def test_original_byte_weights():
    e = C.encode("Hé" + C.TITLE)  # TITLE h é ESC TITLE
    w = C.original_byte_weights(e)
    assert len(w) == len(e.encode("utf-8")) and sum(w) == len(("Hé" + C.TITLE).encode("utf-8"))


@needs_shared
def test_sidecar_bytes_equal_original_utf8_on_the_challenge_docs():
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_TOK))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == [C.TITLE, C.ALLCAPS, C.CAPNEXT, C.ESC]  # the tokenizer's operators
    total_orig = total_side = n_tok = 0
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        ids, nbytes = C.token_bytes(sp, C.encode(text))
        assert len(ids) == len(nbytes) and sum(nbytes) == len(text.encode("utf-8"))
        assert ids == sp.encode(C.encode(text))  # the same tokens as plain encoding
        total_orig += len(text.encode("utf-8"))
        total_side += sum(nbytes)
        n_tok += len(ids)
    assert total_side == total_orig and n_tok > 0


@needs_shared
def test_sidecar_equals_lut_bytes_where_both_apply():
    """On plain sp8192 text with single spaces and no newlines (nothing for the tokenizer to fold), the offsets-based
    byte count per token equals the challenge's LUT rule token by token."""
    import sentencepiece as spm
    import train_gpt as tg
    sp = spm.SentencePieceProcessor(model_file=str(PLAIN_TOK))
    base, lead, boundary = tg.build_byte_luts(sp, sp.vocab_size())
    checked = 0
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        text = " ".join(json.loads(line)["text"].split())  # single spaces only
        ids, nbytes = C.token_bytes(sp, text)  # no transform: plain text, plain tokenizer
        if sp.decode(ids) != text:  # NFKC changed a character: the LUTs count the normalised bytes, not the text's
            continue
        checked += 1
        seq = np.array([sp.bos_id()] + ids)
        lut = base[seq[1:]] + (lead[seq[1:]] & ~boundary[seq[:-1]])
        assert lut.tolist() == nbytes
    assert checked >= 50


# ---- text_to_shards --caseops / --byte-sidecar and train_gpt's sidecar val_bpb ---------------------------------

def _convert(tmp_path, docs: list[str], tok: Path, **kw) -> Path:
    sys.path.insert(0, str(ROOT / "data"))
    import text_to_shards as tts
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "shards"
    tts.convert([src], tok, out, split="val", shard_tokens=50_000, log=lambda m: None, **kw)
    return out


@needs_shared
def test_text_to_shards_caseops_writes_an_aligned_sidecar(tmp_path):
    import train_gpt as tg
    docs = [json.loads(l)["text"] for l in DOCS.read_text(encoding="utf-8").splitlines()[:80]]
    out = _convert(tmp_path, docs, CASEOPS_TOK, case_ops=True)
    toks, side = (sorted(out.glob(f"fineweb_{s}_*.bin")) for s in ("val", "val_bytes"))
    toks = [p for p in toks if "_bytes_" not in p.name]
    assert len(toks) == len(side) >= 2  # several shards: both split at the same places
    t = np.concatenate([np.asarray(tg.load_shard(p)) for p in toks])
    b = np.concatenate([np.asarray(tg.load_shard(p)) for p in side])
    assert t.shape == b.shape and (b[t == 1] == 0).all()  # BOS costs 0
    assert int(b.sum()) == sum(len(d.encode("utf-8")) for d in docs)
    assert not np.isin(t, [tg.load_tokenizer(str(CASEOPS_TOK), 8192)[0].piece_to_id(c) for c in "ABCXYZ"]).any()  # no raw capitals
    assert tg.load_val_byte_sidecar(str(out), t.size).tolist() == b.tolist()
    with pytest.raises(tg.DataError, match="byte sidecar fineweb_val_bytes_\\*.bin has .* entries but the val shards hold"):
        tg.load_val_byte_sidecar(str(out), t.size - 1)


@needs_shared
def test_val_bpb_from_sidecar_equals_luts_and_caseops_config(tmp_path):
    import torch
    import train_gpt as tg
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(PLAIN_TOK))
    docs = [" ".join(json.loads(l)["text"].split()) for l in DOCS.read_text(encoding="utf-8").splitlines()]
    docs = [d for d in docs if sp.decode(sp.encode(d)) == d][:20]  # where both apply: the tokenizer keeps the text
    out = _convert(tmp_path, docs, PLAIN_TOK, byte_sidecar=True)
    env = dict(DATA_PATH=str(out), TOKENIZER_PATH=str(PLAIN_TOK), VOCAB_SIZE="8192", NUM_LAYERS="1", MODEL_DIM="32",
               NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="8", NUM_LOOPS="0", PARALLEL_START_LAYER="0", EVAL_SEQ_LEN="128")
    cpu = torch.device("cpu")
    scores = {}
    for how in ("sidecar", "luts", "auto"):
        cfg = tg.Config.from_env(dict(env, VAL_BYTES=how))
        _, luts, val = tg.load_eval_data(cfg, cpu)
        assert (luts.sidecar is not None) == (how != "luts")
        torch.manual_seed(0)
        model = tg.GPT(cfg)
        scores[how] = tg.evaluate(model, model, val, 128, 128, 4, luts, cpu, 0, 1)
    assert scores["sidecar"] == scores["luts"] == scores["auto"]  # same loss, tokens and bytes, so the same bpb
    # CaseOps: the sidecar is required, the LUTs refused, the operators must be in the tokenizer
    with pytest.raises(tg.ConfigError, match="CASEOPS=1 with VAL_BYTES=luts"):
        tg.Config.from_env(dict(env, CASEOPS="1", VAL_BYTES="luts"))
    with pytest.raises(tg.DataError, match="CASEOPS=1: TOKENIZER_PATH=.* has no pieces for the CaseOps operators"):
        tg.load_eval_data(tg.Config.from_env(dict(env, CASEOPS="1")), cpu)
    for f in out.glob("fineweb_val_bytes_*.bin"):
        f.unlink()
    with pytest.raises(tg.DataError, match="CASEOPS=1: DATA_PATH=.* has no byte sidecar"):
        tg.load_eval_data(tg.Config.from_env(dict(env, CASEOPS="1", TOKENIZER_PATH=str(CASEOPS_TOK))), cpu)
    with pytest.raises(tg.DataError, match="VAL_BYTES=sidecar: DATA_PATH=.* has no byte sidecar"):
        tg.load_eval_data(tg.Config.from_env(dict(env, VAL_BYTES="sidecar")), cpu)
    assert tg.load_eval_data(tg.Config.from_env(env), cpu)[1].sidecar is None  # auto without a sidecar: LUTs
    defaults = tg.Config.from_env({"CASEOPS_ENABLED": "1"})
    assert defaults.caseops and "caseops" in defaults.data_path and "caseops" in defaults.tokenizer_path
