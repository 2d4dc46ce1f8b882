"""The README a new user reads: it starts them on its first screen, and every link in it and in
docs/ leads somewhere."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from harness.paths import REPO

FIRST_SCREEN = 40  # lines
CLONE = "git clone https://github.com/likeness-nodes/ComfyUI-Likeness likeness"
# [text](target) and ![alt](target), a target without spaces; <https://...> autolinks
MARKDOWN_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
AUTOLINK = re.compile(r"<((?:https?|ftp)://[^>\s]+)>")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, 1-based, of the block's content; its content) of each fenced block."""
    blocks, inside, start, lines = [], False, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if inside:
                blocks.append((start, "\n".join(lines)))
            inside, start, lines = not inside, number + 1, []
        elif inside:
            lines.append(line)
    return blocks


def test_the_clone_and_install_block_is_the_first_command_on_the_first_screen():
    text = (REPO / "README.md").read_text()
    first_line, block = code_blocks(text)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip()]
    assert first_line + len(block.splitlines()) <= FIRST_SCREEN, first_line
    assert commands == [CLONE, "cd likeness", "python3 install.py --new-host ~/likeness-host"]
    # nothing before it that a reader might run instead: no other command, no inline code line
    before = text.splitlines()[:first_line - 1]
    assert not any(line.startswith(("    ", "$ ", "python", "pip ")) for line in before), before


def test_the_first_screen_has_a_picture_and_says_what_the_user_gets():
    screen = "\n".join((REPO / "README.md").read_text().splitlines()[:FIRST_SCREEN])
    assert re.search(r"!\[[^\]]+\]\(workflows/\w+\.jpg\)", screen)
    for fact in ("6.5 GB", "http://127.0.0.1:8188/", "--port"):
        assert fact in screen, fact


def test_the_readme_keeps_the_test_command_under_development_after_the_models_and_workflows():
    text = (REPO / "README.md").read_text()
    sections = [m.group(1) for m in re.finditer(r"^## (.+)$", text, re.M)]
    assert sections.index("Install") < sections.index("Model files") < sections.index("Workflows") \
        < sections.index("Tests and development")
    development = text.split("\n## Tests and development\n", 1)[1].split("\n## ", 1)[0]
    assert "python3 tests/run.py" in [block.strip() for _, block in code_blocks(development)]
    assert "python3 tests/run.py" in (REPO / ".ci" / "run").read_text()
    # the first command in the README that mentions tests is the one CI runs (the stop hook's rule)
    mentions = [line for _, block in code_blocks(text) for line in block.splitlines() if "test" in line]
    assert mentions[0].strip() == "python3 tests/run.py"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces as '-'."""
    heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    kept = "".join(c for c in heading.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    inside = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
        match = None if inside else HEADING.match(line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_slugs_follow_githubs_rule():
    assert slug("Training: the forward sampling runs, the papers' recipes") == \
        "training-the-forward-sampling-runs-the-papers-recipes"
    assert slug("Small faces (`likeness/face`: MagicStyle + MagicID's DIIR)") == \
        "small-faces-likenessface-magicstyle--magicids-diir"


def test_every_link_in_the_readme_and_docs_leads_to_a_file_of_the_repository_or_an_https_url():
    checked, broken = 0, []
    for page in pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not linked
        targets = MARKDOWN_LINK.findall(text) + AUTOLINK.findall(text)
        for target in targets:
            checked += 1
            if target.startswith("https://"):
                continue
            if re.match(r"\w+:", target):
                broken.append(f"{page.name}: {target} (not https)")
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_file() or REPO.resolve() not in file.parents:
                broken.append(f"{page.name}: {target} (no such file in the repository)")
            elif anchor and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no heading #{anchor} in {file.name})")
    assert broken == []
    assert checked > 50  # the README's model links and images, the docs' pictures and cross-links


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for page in (REPO / "docs").glob("*.md"):
        assert f"](docs/{page.name})" in readme or f"](docs/{page.name}#" in readme, page.name
