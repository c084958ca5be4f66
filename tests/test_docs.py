"""The documentation holds together: every `§` reference in the code and docs names a heading that exists in the
repository, relative links resolve, nothing outside the repository is cited, and the README stays a map."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILE = re.compile(r"[\w./-]*\b[\w-]+\.md\b")
SECTION = re.compile(r"§\s?(\d[\da-z]*(?:\.\d+)*)(?:\s?[-–]\s?(\d[\da-z]*(?:\.\d+)*))?")
HEADING = re.compile(r"^#+ (\d[\da-z]*(?:\.\d+)*)\.?\s", re.M)
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# The specification and fixtures beside the checkout, which a user of the repository does not have (spelt out of
# pieces so that this file does not cite them itself).
OUTSIDE = tuple(name + suffix for name, suffix in (("METHOD", ".md"), ("ARCHITECTURE", ".md"), ("DATA_FORMATS", ".md"),
                                                   ("../", "shared"), ("shared", "/design")))


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py", "*.md", "*.sh", "Makefile",
                             "*.toml", ".ci/run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in listed.split() if (ROOT / name).is_file()]


def resolve_doc(name: str, cited_from: Path) -> Path | None:
    """A cited .md file: relative to the citing file, the repository root or docs/; None when none exists."""
    for base in (cited_from.parent, ROOT, ROOT / "docs"):
        candidate = (base / name).resolve()
        if candidate.is_file() and ROOT in candidate.parents:
            return candidate
    return None


def section_numbers(doc: Path) -> set[str]:
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def section_references(path: Path) -> list[tuple[int, str, Path | None, str]]:
    """(line, reference text, the document it names, section) for every § on every line of `path`. A § belongs to
    the last .md file named before it on its line, or to `path` itself when that is a Markdown page."""
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for match in SECTION.finditer(line):
            named = list(DOC_FILE.finditer(line[: match.start()]))
            if named:
                doc = resolve_doc(named[-1].group(0), path)
                text = f"{named[-1].group(0)} {match.group(0)}"
            else:
                doc, text = (path if path.suffix == ".md" else None), match.group(0)
            found += [(number, text, doc, section) for section in match.groups() if section]
    return found


def test_every_section_reference_names_a_heading_in_the_repository():
    problems, checked = [], 0
    headings: dict[Path, set[str]] = {}
    for path in tracked_text_files():
        for line, text, doc, section in section_references(path):
            checked += 1
            where = f"{path.relative_to(ROOT)}:{line}: {text}"
            if doc is None:
                problems.append(f"{where}: names no document of the repository")
            elif section not in headings.setdefault(doc, section_numbers(doc)):
                problems.append(f"{where}: {doc.relative_to(ROOT)} has no heading {section}")
    assert not problems, "\n".join(problems)
    assert checked > 100  # the code cites the method throughout


def test_the_reference_check_catches_a_missing_section_and_a_missing_document(tmp_path):
    page = ROOT / "docs" / "method.md"
    assert {"1", "6.4", "7a", "11.32"} <= section_numbers(page)
    sample = tmp_path / "sample.py"
    sign = "\u00a7"  # written out, so that this file itself cites nothing
    sample.write_text(f"# docs/method.md {sign}6.4, {sign}99\n# docs/nowhere.md {sign}1\n# {sign}2 alone\n",
                      encoding="utf-8")
    references = section_references(sample)
    assert [(line, section, doc) for line, _, doc, section in references] == [
        (1, "6.4", page), (1, "99", page), (2, "1", None), (3, "2", None)]
    assert "99" not in section_numbers(page)


def test_nothing_outside_the_repository_is_cited():
    cited = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in tracked_text_files()
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if any(name in line for name in OUTSIDE)]
    assert not cited, "\n".join(cited)


def test_every_cited_document_exists():
    """A document named in code or docs (`docs/x.md`, `bench/RESULTS.md`), with or without a section, exists."""
    missing = [f"{path.relative_to(ROOT)}:{number}: {match.group(0)}"
               for path in tracked_text_files() if path.name != "test_docs.py"
               for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
               for match in re.finditer(r"\b(?:docs|bench)/[\w-]+\.md\b", line)
               if not (ROOT / match.group(0)).is_file()]
    assert not missing, "\n".join(missing)


def test_relative_links_of_the_readme_and_docs_resolve():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in MARKDOWN_LINK.findall(page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_map():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 15 * 1024
    for page in ("method", "data", "training", "predict", "operations", "differences", "speed", "demo",
                 "architecture"):
        assert f"(docs/{page}.md)" in readme
    for launcher in ("start_clip.sh", "start_fusion.sh", "start_retrieval.sh", "start_caption.sh", "start_qa.sh",
                     "frozen_tfrecord.py", "predict.py index", "predict.py query", "predict.py caption",
                     "predict.py answer", "fetch_checkpoints.py", "fetch_clip.py"):
        assert launcher in readme
