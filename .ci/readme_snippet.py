"""Print the README code block that follows ``<!-- compat: NAME -->`` (the compatibility matrix runs it)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- compat: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.DOTALL)
    if m is None:
        raise SystemExit(f"README.md has no code block marked `<!-- compat: {name} -->`")
    return m.group(1)


if __name__ == "__main__":
    sys.stdout.write(snippet(sys.argv[1]))
