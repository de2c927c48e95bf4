"""Regenerate what is derived from train_gpt.FIELDS: the env-var table in README.md (between the marker
comments) and KNOWN_ENV in tools/contract.py."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import contract  # noqa: E402
import train_gpt  # noqa: E402

BEGIN, END = "<!-- env-table:begin -->", "<!-- env-table:end -->"
readme = ROOT / "README.md"
text = readme.read_text()
if BEGIN not in text or END not in text:
    sys.exit(f"{readme}: markers {BEGIN} / {END} not found")
new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda m: f"{BEGIN}\n{train_gpt.env_table_markdown()}\n{END}", text, flags=re.S)
readme.write_text(new)
print(f"updated {readme}")
print(f"{'updated' if contract.regenerate(train_gpt) else 'unchanged'}: KNOWN_ENV in {contract.__file__}")
