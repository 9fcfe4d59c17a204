"""The repository stands alone: no tracked file points at documents or folders outside the checkout."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

OUTSIDE = re.compile(r"\.\./shared|conventions\.md")


def _tracked() -> list:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / p for p in out.splitlines() if (REPO / p).is_file()]


def test_no_file_refers_outside_the_repository():
    files = _tracked()
    assert len(files) > 50  # the listing worked (a test that reads nothing cannot fail)
    hits = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(REPO)}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if OUTSIDE.search(line) and path.name != "test_repository.py"]
    assert not hits, "files refer to things outside the repository:\n" + "\n".join(hits)


def test_the_check_finds_a_reference():
    assert OUTSIDE.search("see ../shared/docs/method.md") and OUTSIDE.search("(conventions.md)")
    assert not OUTSIDE.search("docs/method.md, 'Profiles'")
