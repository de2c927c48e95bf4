#!/usr/bin/env bash
# Build the project's standard local dataset (sp8192) from the shared sample text:
#   train <- fineweb_edu_sample10BT_first1Mchars.txt + openwebtext10k_val500.jsonl
#   val   <- fineweb_challenge_docs_200.jsonl (validation-only text)
# Output: data/datasets/local_sp8192/ (git-ignored). Nothing from shared/ is copied into the repo.
# Env overrides: SHARED (default <repo>/../shared), OUT_DIR, TOKENIZER, PYTHON.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${SHARED:-$REPO/../shared}"
[[ -d "$SHARED" ]] && SHARED="$(cd "$SHARED" && pwd)"
TEXT="$SHARED/data/text"
TOKENIZER="${TOKENIZER:-$SHARED/data/tokenizers/fineweb_8192_bpe.model}"
OUT_DIR="${OUT_DIR:-$REPO/data/datasets/local_sp8192}"
PY="${PYTHON:-python3}"
for f in "$TEXT/fineweb_edu_sample10BT_first1Mchars.txt" "$TEXT/openwebtext10k_val500.jsonl" \
         "$TEXT/fineweb_challenge_docs_200.jsonl" "$TOKENIZER"; do
  [[ -f "$f" ]] || { echo "error: missing $f (is the shared data folder at $SHARED?)" >&2; exit 1; }
done
"$PY" "$REPO/data/text_to_shards.py" --split train --overwrite -t "$TOKENIZER" --out-dir "$OUT_DIR" \
  "$TEXT/fineweb_edu_sample10BT_first1Mchars.txt" "$TEXT/openwebtext10k_val500.jsonl"
"$PY" "$REPO/data/text_to_shards.py" --split val --overwrite -t "$TOKENIZER" --out-dir "$OUT_DIR" \
  "$TEXT/fineweb_challenge_docs_200.jsonl"
echo "done: DATA_PATH=$OUT_DIR TOKENIZER_PATH=$TOKENIZER"
