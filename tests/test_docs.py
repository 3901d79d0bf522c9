"""The README and docs/ pages: every relative link and #anchor resolves, and the README fits on a
screen or two."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "launch" / "README.md", *(ROOT / "docs").glob("*.md"),
                *(ROOT / "benchmarks").glob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
  return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):  # https:, mailto:
      continue
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    if not dest.exists():
      broken.append(target)
    elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
      broken.append(target)
  assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_readme_is_short():
  assert (ROOT / "README.md").stat().st_size <= 10_000
