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


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchor of every Markdown heading outside fenced blocks: lower case, punctuation dropped,
    spaces to hyphens."""
    prose, inside = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and (inside is None or m["fence"].startswith(inside)):
            inside = m["fence"] if inside is None else None
        elif inside is None:
            prose.append(line)
    titles = re.findall(r"^#{1,6} (.+?)#*$", "\n".join(prose), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def broken_anchors(doc: Path) -> list[str]:
    """The ``[text](file.md#anchor)`` and ``[text](#anchor)`` links of ``doc`` whose file or heading is missing."""
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", doc.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        page = doc.parent / target if target else doc
        if not page.is_file() or anchor not in heading_anchors(page.read_text()):
            broken.append(f"{target}#{anchor}")
    return broken


def test_heading_anchors():
    text = "# Top\n## The median pruner: Sports (21 trials)\n```bash\n# not a heading\n```\n"
    assert heading_anchors(text) == {"top", "the-median-pruner-sports-21-trials"}


def test_broken_anchor_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# A\n[ok](#a) [self](#b) [other](c.md#a) [there](a.md#a)\n")
    assert broken_anchors(tmp_path / "a.md") == ["#b", "c.md#a"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_anchor_links_resolve(doc):
    assert not broken_anchors(doc), f"{doc.relative_to(ROOT)}: links to a missing heading: {broken_anchors(doc)}"


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


def _public_objects():
    """(qualified name, object) of every public class and function of the package and of its public
    modules (dif_attention, functional, models, analysis, baselines, ops), and the public methods of the classes."""
    import inspect

    from dif_attention import analysis, baselines, ops
    seen = {}
    for prefix, mod in (("", dif_attention), ("functional.", functional), ("models.", models),
                        ("analysis.", analysis), ("baselines.", baselines), ("ops.", ops)):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                seen.setdefault(id(obj), (prefix + name, obj))
    out = []
    for qual, obj in seen.values():
        out.append((qual, obj))
        if inspect.isclass(obj):
            for mname, member in vars(obj).items():
                if inspect.isfunction(member) and (not mname.startswith("_") or mname in ("__init__", "forward")):
                    out.append((f"{qual}.{mname}", member))
    return out


def test_every_public_name_has_a_docstring_and_type_hints():
    """The public API documents itself: a docstring on every public class, function, method and ``forward``
    (``__init__`` is the class's docstring), and an annotation on every parameter and return value."""
    import inspect
    no_doc, no_hint = [], []
    for qual, obj in _public_objects():
        is_init = qual.endswith(".__init__")
        if not is_init and not (inspect.getdoc(obj) or "").strip():
            no_doc.append(qual)
        if inspect.isclass(obj) or qual.endswith("extra_repr"):
            continue
        sig = inspect.signature(obj)
        for p in sig.parameters.values():
            if p.name in ("self", "cls", "ctx") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.annotation is inspect.Parameter.empty:
                no_hint.append(f"{qual}({p.name})")
        if not is_init and sig.return_annotation is inspect.Signature.empty:
            no_hint.append(f"{qual} -> ?")
    assert not no_doc, f"no docstring: {no_doc}"
    assert not no_hint, f"no type hint: {no_hint}"
