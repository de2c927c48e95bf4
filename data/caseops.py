"""CaseOps: the records' lossless case transform (sota_spec.md s1.7, `caseops_v1`), and the per-token byte sidecar.

Text is rewritten so that ASCII letters are always lowercase and case lives in four operator characters
(Unicode private use, each its own piece in the CaseOps tokenizer):

  TITLE   U+E001  next letter is uppercase            "The"    -> TITLE "the"
  ALLCAPS U+E002  the whole following letter run      "NASA"   -> ALLCAPS "nasa"     (runs of length >= 2)
  CAPNEXT U+E003  next letter is uppercase (mid-word) "McDonald" -> TITLE "mc" CAPNEXT "donald"
  ESC     U+E004  next character is a literal         "\\ue001" -> ESC "\\ue001"  (an operator already in the text)

Words are maximal runs of ASCII letters; everything else (digits, punctuation, non-ASCII letters) is untouched.
`decode(encode(s)) == s` for every string (tests/test_caseops.py checks random and adversarial strings).

Byte sidecar: val_bpb must count the ORIGINAL text's UTF-8 bytes, not the transformed text's (an operator is 3
UTF-8 bytes that the original never had). `token_bytes` gives, per token of the transformed text, the original
bytes behind it: operators 0, an ESC-escaped literal its own UTF-8 length, every other character its UTF-8
length; a BOS 0. Needs SentencePiece's piece offsets (`protobuf` installed), so that whitespace the tokenizer
folds away (runs of spaces / newlines become one piece) is still charged to the piece it belongs to.

Library use: encode(text), decode(text), token_bytes(sp, text) -> (ids, bytes). No train_gpt import.
"""
from __future__ import annotations

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = frozenset((TITLE, ALLCAPS, CAPNEXT, ESC))


def _is_ascii_letter(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _encode_word(w: str) -> str:
    if w.islower():
        return w
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + w.lower()
    out = [TITLE + w[0].lower()] if w[0].isupper() else [w[0]]
    for c in w[1:]:
        out.append(CAPNEXT + c.lower() if c.isupper() else c)
    return "".join(out)


def encode(text: str) -> str:
    """The CaseOps transform of `text` (see the module doc)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if _is_ascii_letter(c):
            j = i + 1
            while j < n and _is_ascii_letter(text[j]):
                j += 1
            out.append(_encode_word(text[i:j]))
            i = j
        else:
            out.append(ESC + c if c in OPERATORS else c)
            i += 1
    return "".join(out)


class CaseOpsError(ValueError):
    pass


def decode(text: str) -> str:
    """Inverse of `encode`. Raises CaseOpsError on text no `encode` output can contain (an operator not
    followed by what it applies to)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == ESC:
            if i + 1 >= n:
                raise CaseOpsError(f"ESC at the end of the text (position {i})")
            out.append(text[i + 1])
            i += 2
        elif c in (TITLE, CAPNEXT):
            if i + 1 >= n or not ("a" <= text[i + 1] <= "z"):
                raise CaseOpsError(f"{'TITLE' if c == TITLE else 'CAPNEXT'} at position {i} not followed by a lowercase ASCII letter")
            out.append(text[i + 1].upper())
            i += 2
        elif c == ALLCAPS:
            j = i + 1
            while j < n and "a" <= text[j] <= "z":
                j += 1
            if j - i - 1 < 2:
                raise CaseOpsError(f"ALLCAPS at position {i} not followed by >= 2 lowercase ASCII letters")
            out.append(text[i + 1:j].upper())
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def original_byte_weights(transformed: str) -> list[int]:
    """Per UTF-8 byte of the transformed text: how many bytes of the original it stands for (0 or 1), so that the
    weights of a character's bytes add up to its original UTF-8 length (operators: 0; an ESC'd literal: its length)."""
    w, i, n = [], 0, len(transformed)
    while i < n:
        c = transformed[i]
        if c == ESC and i + 1 < n:
            w += [0] * 3 + [1] * len(transformed[i + 1].encode("utf-8"))
            i += 2
            continue
        w += [0] * 3 if c in OPERATORS else [1] * len(c.encode("utf-8"))
        i += 1
    return w


def token_bytes(sp, transformed: str) -> tuple[list[int], list[int]]:
    """(token ids, original UTF-8 bytes per token) of an already transformed document. Each piece owns the input
    bytes [begin, end) of SentencePiece's offsets; bytes the tokenizer normalises away (folded whitespace) belong to
    the piece whose span holds them. sum(bytes) == len(decode(transformed).encode())."""
    try:
        proto = sp.encode(transformed, out_type="proto")
    except Exception as e:  # noqa: BLE001 - sentencepiece needs protobuf for offsets
        raise RuntimeError(f"CaseOps byte sidecar: SentencePiece piece offsets are needed ({e}); pip install protobuf") from None
    weights = original_byte_weights(transformed)
    ids, nbytes, prev_end = [], [], 0
    for p in proto.pieces:
        end = max(prev_end, p.end)  # pieces partition the input: each owns [previous end, its end), gaps included
        ids.append(p.id)
        nbytes.append(sum(weights[prev_end:end]))
        prev_end = end
    if nbytes:  # trailing bytes no piece spans (trailing whitespace): the last piece
        nbytes[-1] += sum(weights[prev_end:])
    # A run of byte-fallback pieces gets its characters' bytes one per piece (the offsets hand a whole character
    # to its last byte piece; NFKC can also make more byte pieces than original bytes): same total, never negative.
    i = 0
    while i < len(ids):
        if not sp.is_byte(ids[i]):
            i += 1
            continue
        j = i
        while j < len(ids) and sp.is_byte(ids[j]):
            j += 1
        total = sum(nbytes[i:j])
        nbytes[i:j] = [1 if t < total else 0 for t in range(j - i)]
        nbytes[j - 1] += max(total - (j - i), 0)
        i = j
    return ids, nbytes
