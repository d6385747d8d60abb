"""The documentation: the README stays short and links every page of docs/, and every relative
link in the README and docs/ leads to a file or directory of the repository (and, for a
`page.md#section` link, to a heading of that page).

Links are markdown's inline ones, `[text](target)` and `![alt](target)`, outside fenced code
blocks and code spans. Links with a scheme (`https:`, `mailto:`, ...) are not checked; a pure
`#section` link is checked against the headings of its own file. Anchors are GitHub's heading
slugs: lower case, punctuation other than `-` and `_` dropped, spaces turned into `-`, and
`-1`, `-2`, ... appended to repeated headings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 12_000

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class Link:
    source: Path
    line: int
    target: str

    def __str__(self) -> str:
        source = self.source.relative_to(ROOT) if self.source.is_relative_to(ROOT) else self.source
        return f"{source}:{self.line}: ({self.target})"


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)):
                fence = None
        else:
            lines.append((number, line))
    return lines


def links_in(path: Path) -> list[Link]:
    """The file's links, a link whose text runs over a line break included, at its first line."""
    numbered = prose_lines(path.read_text(encoding="utf-8"))
    text = "\n".join(CODE_SPAN.sub("", line) for _number, line in numbered)
    return [
        Link(path, numbered[text.count("\n", 0, match.start())][0], match.group(1))
        for match in LINK.finditer(text)
    ]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before de-duplication)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


@cache
def anchors_of(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for _number, line in prose_lines(path.read_text(encoding="utf-8")):
        heading = HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return frozenset(anchors)


def resolve(link: Link) -> Path | None:
    """The file or directory a relative link points at; None for a link with a scheme."""
    if SCHEME.match(link.target):
        return None
    path, _, _fragment = link.target.partition("#")
    if not path:
        return link.source
    return (link.source.parent / path).resolve()


def broken(link: Link, root: Path = ROOT) -> str | None:
    """Why the link leads nowhere, or None when it is fine (or not relative)."""
    target = resolve(link)
    if target is None:
        return None
    if not target.is_relative_to(root):
        return "points outside the repository"
    if not target.exists():
        return "no such file or directory"
    _path, hashed, fragment = link.target.partition("#")
    if hashed and target.suffix == ".md":
        if not fragment:
            return "empty anchor"
        if fragment not in anchors_of(target):
            return f"no heading with the anchor #{fragment} in {target.relative_to(root)}"
    return None


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move the detail to a page in docs/"
    )


@pytest.mark.parametrize("source", [README, *pages()], ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(source: Path) -> None:
    failures = [f"{link}: {reason}" for link in links_in(source) if (reason := broken(link)) is not None]
    assert not failures, "\n".join(failures)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {target for link in links_in(README) if (target := resolve(link)) is not None}
    unlinked = [str(page.relative_to(ROOT)) for page in pages() if page.resolve() not in linked]
    assert pages(), "docs/ has no pages"
    assert not unlinked, f"README.md does not link {', '.join(unlinked)} (add it to Documentation)"


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    """The checks above can fail: links and anchors are found where they are, and only there."""
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## `billing trigger`\n\n## Step\n\n## Step\n")
    (tmp_path / "picture.png").write_bytes(b"")
    page.write_text(
        "# Title\n\n"
        "[ok](other.md) ![ok](picture.png) [ok](other.md#billing-trigger) [ok](other.md#step-1)\n"
        "[ok](#title) [ok](https://example.com/missing.md) [ok](mailto:someone@example.com)\n"
        "`[not a link](missing-in-code-span.md)`\n"
        "```md\n[not a link](missing-in-a-fence.md)\n```\n"
        "[broken](missing.md) ![broken](missing.png) [broken](other.md#nowhere) [broken](#nowhere)\n"
        "[broken](other.md#step-2) [broken, its text over\ntwo lines](other.md#over-two-lines)\n"
    )
    found = [link.target for link in links_in(page)]
    assert "missing-in-code-span.md" not in found and "missing-in-a-fence.md" not in found
    assert "https://example.com/missing.md" in found and "missing.png" in found
    reasons = {link.target: broken(link, root=tmp_path) for link in links_in(page)}
    assert {target for target, reason in reasons.items() if reason is not None} == {
        "missing.md",
        "missing.png",
        "other.md#nowhere",
        "#nowhere",
        "other.md#step-2",
        "other.md#over-two-lines",
    }
    assert [link.line for link in links_in(page) if link.target == "other.md#over-two-lines"] == [10]
    # a link leaving the repository is refused even when the file exists there
    assert broken(Link(page, 1, "other.md"), root=tmp_path / "sub") == "points outside the repository"


def test_slugs_are_githubs() -> None:
    assert slug("Plan changes, cancel and resume") == "plan-changes-cancel-and-resume"
    assert slug("Properties (hypothesis)") == "properties-hypothesis"
    assert slug("`billing trigger`") == "billing-trigger"
    assert slug("Windows, limits and reading") == "windows-limits-and-reading"
    assert slug("Stripe: plans, catalog and API calls") == "stripe-plans-catalog-and-api-calls"
