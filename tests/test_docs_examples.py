"""The docs: every example in README.md and docs/ runs as written (tests/docs_examples.py),
every page is reachable from the README, and no link leaves the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from docs_examples import ROOT, blocks, pages, run_page

LINK = re.compile(r"\]\(([^)\s]+)\)")
# Files the project once cited from beside the clone (written in pieces, not to match here).
OUTSIDE = "|".join(("shared" + "/", "ARCHITECTURE" + ".md", "spec" + "/routing"))


@pytest.mark.slow
@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_examples_run_as_written(page: Path, tmp_path: Path):
    run_page(page, tmp_path)


def test_readme_is_a_front_door_to_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {Path(m).name for m in LINK.findall(readme) if m.startswith("docs/")}
    assert {p.name for p in (ROOT / "docs").glob("*.md")} <= linked


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_links_stay_in_the_repository_and_resolve(page: Path):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert path.exists(), f"{page.name}: {target} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name}: {target}: no such heading"


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces as -."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_code_and_docs_cite_only_files_in_the_repository():
    """The routing spec and the architecture sketch live in docs/ now: nothing may send a
    reader to a file the clone does not have."""
    texts = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".toml", ".sh", ".yaml")
             and p.is_file() and not set(p.relative_to(ROOT).parts[:1]) & {".venv", ".git"}]
    bad = [f"{p.relative_to(ROOT)}" for p in texts
           if re.search(OUTSIDE, p.read_text(errors="ignore"))]
    assert not bad, bad


def test_every_example_block_declares_what_it_is():
    for page in pages():
        for block in blocks(page):
            assert block.lang in ("sh", "python", "text", "json", "yaml", "toml", ""), (
                f"{block.where}: ```{block.lang}")
