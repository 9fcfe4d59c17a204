"""Every notebook keeps the notebook contract of conventions.md (cheap static checks)."""

from __future__ import annotations

import ast
import json
import re

import pytest

from conftest import REPO
from tskd_utils.reproduce import NOTEBOOKS

PARAMETERS = {"profile", "dataset", "data_root", "run_dir", "n_labeled", "seed", "overrides"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_contract(name):
    path = REPO / "notebooks" / f"{name}.ipynb"
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# ")
    assert "colab.research.google.com" in first and "kaggle.com" in first
    assert re.search(r"CPU ok|GPU recommended", first) and re.search(r"\d+ ?(s|min)", first)
    setup = "".join(cells[1]["source"])
    assert "find_spec" in setup and "pip" in setup  # installs only what is missing
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assigned = {t.id for node in ast.parse("".join(tagged[0]["source"])).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert PARAMETERS <= assigned
    # papermill must parse every parameter line itself (an "=" in a comment makes it skip the
    # line with "Unable to parse line" and report the parameter as unknown)
    import papermill
    assert PARAMETERS <= set(papermill.inspect_notebook(str(path)))
    for c in cells:
        if c["cell_type"] == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, "outputs must be stripped"
            code = [ln for ln in "".join(c["source"]).splitlines() if ln.strip() and not ln.strip().startswith("#")]
            assert len(code) <= 20, f"a cell of {len(code)} lines belongs in tskd_utils"
    assert path.stat().st_size < 200_000
