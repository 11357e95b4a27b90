"""The documentation's code runs: every ```python block of ``README.md`` and ``docs/**/*.md``.

The convention, also stated in docs/index.md:

* the ``python`` blocks of one page run top to bottom in one namespace (a later block may use what an
  earlier one imported), in a fresh temporary working directory, with one torch thread;
* a block preceded by the line ``<!-- no-test -->`` (blank lines between allowed) is not run: a fragment
  such as a signature with ``...``, or an example that needs several processes. Use it sparingly;
* blocks in other languages (``bash``, ``yaml``, ``text``, ``json``) are never run.

A failing block is reported with its page and line. Besides, the pages and tests that cite a
``docs/...md`` file must find it there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
NO_TEST = "<!-- no-test -->"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skipped: bool


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, dedented by their fence's indentation."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        before = [line.strip() for line in lines[:i] if line.strip()]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        skipped = bool(before) and before[-1] == NO_TEST
        found.append(Block(page, i + 1, opening["info"].lower(), "\n".join(body) + "\n", skipped))
        i = j + 1
    return found


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = {page: [b for b in blocks(page) if b.language == "python" and not b.skipped] for page in PAGES}


@pytest.mark.parametrize("page", [p for p in PAGES if RUNNABLE[p]], ids=_name)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in RUNNABLE[page]:
        where = f"{_name(page)}:{block.line}"
        try:
            exec(compile(block.code, where, "exec"), namespace)
        except Exception as err:
            err.add_note(f"in the ```python block at {where}")
            raise


def test_every_no_test_marker_precedes_a_python_block() -> None:
    """A marker that skips nothing (a typo, or a block turned into another language) is a mistake."""
    for page in PAGES:
        markers = [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip() == NO_TEST]
        skipped = [b for b in blocks(page) if b.skipped and b.language == "python"]
        assert len(markers) == len(skipped), f"{_name(page)}: a {NO_TEST} marker skips no python block"


def test_the_docs_run_enough_code() -> None:
    """The convention is used sparingly: most python blocks run, and the extraction finds them."""
    python = [b for page in PAGES for b in blocks(page) if b.language == "python"]
    skipped = [b for b in python if b.skipped]
    assert len(python) >= 10
    assert len(skipped) <= len(python) // 3, [f"{_name(b.page)}:{b.line}" for b in skipped]


def test_cited_docs_exist() -> None:
    """Tests and pages that cite ``docs/<page>.md`` (the design contract, for one) find that file."""
    sources = [*(ROOT / "tests").rglob("*.py"), *PAGES]
    cited = {
        (source, match)
        for source in sources
        for match in re.findall(r"\bdocs/[\w/]+\.md\b", source.read_text(encoding="utf-8"))
    }
    assert any(match == "docs/design.md" for _, match in cited)
    missing = [
        f"{_name(source)} cites {match}" for source, match in sorted(cited) if not (ROOT / match).is_file()
    ]
    assert not missing
