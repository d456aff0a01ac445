"""Every ```python block in README.md and docs/**/*.md runs as written, so examples cannot rot.

The blocks of one page run in order in one namespace (a later block may use what an earlier one
defined), in a fresh temporary directory, offline. Anything that is not meant to run is written as
```text or ```bash. A page without python blocks is still collected, and must have none to fail on.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# a fence opening with ```python at the start of a line, up to the next closing fence
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) for every ```python block of a markdown text."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_block_extraction_finds_python_blocks_only():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n```text\nx\n```\n\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (12, "b = a + 1\n")]


def test_the_docs_have_examples_to_run():
    assert sum(len(python_blocks(p.read_text())) for p in PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_python_blocks_run(page: Path, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # `benchmarks` / `tests` helpers importable as in the repo
    threads = torch.get_num_threads()
    namespace: dict = {"__name__": f"docs_example_{page.stem}"}
    try:
        for line, code in blocks:
            try:
                exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
            except Exception as error:  # name the block, keep the traceback
                raise AssertionError(f"{page.relative_to(ROOT)}, python block at line {line} failed: "
                                     f"{type(error).__name__}: {error}") from error
    finally:
        torch.set_num_threads(threads)


def test_readme_links_to_docs_pages_that_exist():
    """The README is not built by mkdocs (whose --strict build checks the site's own links)."""
    targets = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert targets and [t for t in targets if not (ROOT / t).is_file()] == []
