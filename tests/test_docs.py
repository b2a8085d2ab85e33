"""The README and docs/ point only at things that exist: files in the repository and headings in its documents."""

import re

from pack import ROOT

DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = [*sorted((ROOT / "lens_core").rglob("*.py")), *sorted((ROOT / "nodes").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_relative_links_reach_files_and_headings():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith("https://"):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.is_file() and ROOT in file.parents, f"{doc.name}: {target}"
            if anchor:
                assert anchor in anchors(file.read_text()), f"{doc.name}: {target}"


def test_docstrings_cite_headings_of_the_architecture_document():
    headings = {h.lower() for h in re.findall(r"^#+ (.+)$", (ROOT / "docs" / "architecture.md").read_text(), flags=re.M)}
    cited = [(path.name, section) for path in CODE if path.name != "test_docs.py"
             for section in re.findall(r"docs/architecture\.md[, (]+([A-Z][\w ]+?)[).,]", path.read_text())]
    assert len(cited) >= 12
    for name, section in cited:
        assert all(part.strip().lower() in headings for part in section.split(" and ")), (name, section)


def test_nothing_refers_to_files_outside_the_repository():
    for path in DOCS + CODE:
        if path.name != "test_docs.py":
            assert "lens_spec" not in path.read_text(), path.name


def test_ci_runs_the_readmes_test_commands_as_written():
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"## For developers.*?```\n(.*?)```", readme, flags=re.S)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    (command,) = block.strip().splitlines()
    assert command.startswith("python3 -m venv .venv && ") and command in ci
    assert ".venv/bin/python -m pytest -q -m slow" in ci and "`.venv/bin/python -m pytest -q -m slow`" in readme
