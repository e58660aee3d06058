"""The docs' cross-references resolve: every relative Markdown link in README.md and
docs/*.md names a file that exists (and, with ``#anchor``, an anchor of that file), and
every citation of a section by name -- ``docs/UFFD.md, "Background fill"`` in the docs,
the code's comments and docstrings, and the ``--help`` texts -- names a heading (or a
bold paragraph lead) of that file.  Sections move (docs/MEASUREMENTS.md took the dated
runs out of docs/BENCHMARKS.md and docs/UFFD.md); a reference left behind fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [ROOT / "README.md", *DOCS]
CODE_DIRS = ("loader", "aio", "protocol", "workloads", "bench", "cli", "tests", "examples")

LINK = re.compile(r"\]\(([^)\s]+)\)")
#: ``docs/NAME.md`` (or ``NAME.md`` inside docs/), an optional comma, then a quoted name
CITATION = re.compile(r"\b((?:docs/)?[A-Z]+\.md),? [\"“]([^\"”]{2,80})[\"”]")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces as ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "")).strip().lower()


def _anchors(path: Path) -> set[str]:
    text = path.read_text()
    out = set(re.findall(r'<a id="([^"]+)"></a>', text))
    out.update(_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M))
    return out


def _section_names(path: Path) -> list[str]:
    text = path.read_text()
    names = [re.sub(r"^\d+\. ", "", n) for n in re.findall(r"^#+ (.+)$", text, flags=re.M)]  # "## 3. Working sets"
    names += re.findall(r"\*\*([^*]+?)\.?\*\*", text)  # a bold lead: **Spinning.**
    return [_plain(n) for n in names]


def _joined(path: Path) -> str:
    """The file's text with each line's comment or list prefix dropped and the lines
    joined, so that a citation broken over two lines reads as one."""
    lines = []
    for line in path.read_text().splitlines():
        lines.append(re.sub(r"^\s*(#:?|//|\*|>)?\s*", "", line))
    return " ".join(lines)


def _links() -> list[tuple[str, str]]:
    out = []
    for path in MARKDOWN:
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            out.append((str(path.relative_to(ROOT)), target))
    return out


def _citations() -> list[tuple[str, str, str]]:
    files = [*MARKDOWN, *(p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py")))]
    out = []
    for path in files:
        for doc, name in CITATION.findall(_joined(path)):
            out.append((str(path.relative_to(ROOT)), doc, name))
    return out


def test_the_scans_see_links_and_citations() -> None:
    # (a scan that finds nothing passes every check below)
    assert len(_links()) > 50
    assert len(_citations()) > 20
    assert ("docs/UFFD.md", "Background fill") in {(d, n) for _, d, n in _citations()}


@pytest.mark.parametrize(("where", "target"), _links())
def test_every_relative_link_resolves(where: str, target: str) -> None:
    base = (ROOT / where).parent
    file, _, anchor = target.partition("#")
    path = (base / file).resolve() if file else ROOT / where
    assert path.exists(), f"{where}: link to {target}: no such file"
    if anchor and path.suffix == ".md":
        assert anchor in _anchors(path), f"{where}: link to {target}: no such anchor"


@pytest.mark.parametrize(("where", "doc", "name"), _citations())
def test_every_section_cited_by_name_exists(where: str, doc: str, name: str) -> None:
    path = ROOT / doc if doc.startswith("docs/") else ROOT / "docs" / doc
    assert path.exists(), f"{where}: cites {doc}, which does not exist"
    wanted = _plain(name)
    assert any(n.startswith(wanted) for n in _section_names(path)), (
        f'{where}: cites {doc}, "{name}": no heading or bold lead of that name')


def test_the_checks_catch_a_moved_section(tmp_path: Path) -> None:
    doc = tmp_path / "X.md"
    doc.write_text('# X\n\n## Kept\n\n<a id="an-entry"></a>\n\n**Lead.**  Text.\n')
    assert {"kept", "an-entry", "x"} <= _anchors(doc)
    assert "gone" not in _anchors(doc)
    names = _section_names(doc)
    assert any(n.startswith("lead") for n in names)
    assert not any(n.startswith("measured") for n in names)


def test_design_has_a_row_for_every_module():
    """docs/DESIGN.md keeps a row per module (the guide's rule): every module of the
    packages is named there, by its path or, in a grouped row, by its file name."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    missing = [str(p.relative_to(ROOT)) for top in ("loader", "aio", "protocol", "workloads", "bench", "cli")
               for p in sorted((ROOT / top).rglob("*.py"))
               if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in design and f"`{p.name}`" not in design]
    assert missing == []
