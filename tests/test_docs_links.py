"""The README and docs/ stay a front door that works offline: every relative link resolves to a
file or folder of the repository (and an anchor to a heading of its page), no link leaves the
repository, and README.md stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1", re.S)
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
BARE_URL = re.compile(r"(?:https?|ftp)://|www\.", re.I)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks and code spans (commands there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to -."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, numbered as GitHub numbers repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = github_slug(title)
        count = seen.get(slug, 0)
        out.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return out


def link_problems(page: Path, repo: Path = REPO) -> list[str]:
    """What is wrong with the links of one page, one line each (empty when all resolve)."""
    text = prose(page.read_text())
    targets = INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text)
    problems = []
    for url in BARE_URL.findall(INLINE_LINK.sub("", text)):
        problems.append(f"{page.name}: a bare URL ({url}...) outside code")
    for target in targets:
        if SCHEME.match(target) or target.startswith("//"):
            problems.append(f"{page.name}: {target} leaves the repository")
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if repo.resolve() not in (resolved, *resolved.parents):
            problems.append(f"{page.name}: {target} points outside the repository")
        elif not resolved.exists():
            problems.append(f"{page.name}: {target} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{page.name}: {target} names no heading of {resolved.name}")
    return problems


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves_inside_the_repository(page):
    assert link_problems(page) == []


def test_readme_is_a_short_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_the_checker_finds_broken_links(tmp_path):
    """The checker itself: a good link and anchor pass, each kind of bad link is reported."""
    (tmp_path / "other.md").write_text(
        "# Title\n\n## The cost of HAM's step\n\n## Notes\n## Notes\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#the-cost-of-hams-step) [ok](other.md#notes-1) [ok](#top)\n"
        "# Top\n"
        "`[code](missing.md)` and\n```\n[fenced](missing.md) https://example.org\n```\n"
        "[gone](missing.md) [anchor](other.md#nowhere) [web](https://example.org)\n"
        "[up](../../outside.md) see www.example.org\n"
    )
    problems = link_problems(page, repo=tmp_path)
    assert len(problems) == 5, problems
    for expected in ("missing.md does not exist", "names no heading", "leaves the repository",
                     "points outside the repository", "bare URL"):
        assert any(expected in p for p in problems), (expected, problems)


@pytest.mark.parametrize("heading, slug", [
    ("Reading PGD against AutoAttack", "reading-pgd-against-autoattack"),
    ("The cost of HAM's step", "the-cost-of-hams-step"),
    ("One machine, several hosts", "one-machine-several-hosts"),
    ("Scaling: GPUs, TPUs, several hosts", "scaling-gpus-tpus-several-hosts"),
    ("`hamjax.models`", "hamjaxmodels"),
    ("(a) TPU VM pod slice (e.g. v4-32: 4 hosts x 4 chips)",
     "a-tpu-vm-pod-slice-eg-v4-32-4-hosts-x-4-chips"),
])
def test_github_slug_matches_github_anchors(heading, slug):
    assert github_slug(heading) == slug
