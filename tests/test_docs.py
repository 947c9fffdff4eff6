"""Every ```python block in README.md and docs/*.md runs, and docs/api.md documents every public name.

The blocks of one file run in order in one namespace (a later block may use an earlier one's names),
in a temporary working directory. A block opts out with the line ``<!-- skip-test -->`` just before
its opening fence (for blocks that need a GPU, a dataset or minutes of training).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import dif_attention
from dif_attention import functional, models

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = "<!-- skip-test -->"
FENCE = re.compile(r"^(?P<indent>[ ]{0,3})(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, skipped)`` for each fenced block whose info string starts with ``python``."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m["fence"], i
        j = i + 1
        while j < len(lines) and not lines[j].lstrip().startswith(fence):
            j += 1
        lang = m["info"].strip().split()[0].lower() if m["info"].strip() else ""
        if lang in ("python", "py", "python3"):
            before = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
            indent = len(m["indent"])
            code = "\n".join(ln[indent:] if ln[:indent].isspace() else ln for ln in lines[start + 1:j])
            blocks.append((start + 1, code, before == SKIP))
        i = j + 1
    return blocks


def test_block_parser():
    text = "x\n```python\na = 1\n```\n\n<!-- skip-test -->\n\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "a = 1", False), (8, "raise SystemExit", True)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    blocks = python_blocks(doc.read_text())
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    if not runnable:
        pytest.skip(f"no runnable python block in {doc.name}")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{doc.stem}"}
    for line, code in runnable:
        try:
            exec(compile(code, f"{doc.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as exc:  # report the file and the block's line
            raise AssertionError(f"{doc.relative_to(ROOT)}, block at line {line}: {type(exc).__name__}: {exc}") from exc


def public_names() -> list[str]:
    names = [n for n in dif_attention.__all__ if n != "functional"]
    names += [f"functional.{n}" for n in functional.__all__ if n not in dif_attention.__all__]
    documented_together = {"MODELS", "ATTRIBUTE_MODELS", "SequenceModel", "hyper_parameters", "init_weights"}
    return names + [n for n in models.__all__ if n not in documented_together]


def test_api_reference_covers_every_public_name():
    api = (ROOT / "docs" / "api.md").read_text()
    headings = set(re.findall(r"^#{2,4} `([^`(]+)", api, flags=re.M))
    missing = [n for n in public_names() if n not in headings and n.split(".")[-1] not in headings]
    assert not missing, f"docs/api.md has no heading for: {missing}"
