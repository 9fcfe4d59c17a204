"""Every notebook keeps the notebook contract (README, "Contributing"; cheap static checks)."""

from __future__ import annotations

import ast
import json
import re

import pytest

from conftest import REPO
from tskd_utils.reproduce import NOTEBOOKS

PARAMETERS = {"profile", "dataset", "data_root", "run_dir", "n_labeled", "seed", "overrides"}
WITH_CORE = ("02_teacher_lora_finetuning", "03_diffusion_synthesis", "04_distillation")
WITH_LOOP = ("02_teacher_lora_finetuning", "03_diffusion_synthesis", "04_distillation")  # the stage's training loop written out as code
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# a result typed into prose (a score such as 0.87 or 0.311): results come from cells, not from the text
TYPED_RESULT = re.compile(r"(?<![\w.`$])0\.\d{2,}(?![\w`])")
# a paired difference typed into prose: "-0.2 points", "+2.8 pp", or its interval "[-1.7, +1.0]"
# (an interval has decimals: "[-1, 1]" is a range of values, not a result)
_SIGNED, _DEC = r"[+\-\u2212]\d+\.\d+", r"[+\-\u2212]?\d+\.\d+"
TYPED_DIFFERENCE = re.compile(r"(?<![\w.])[+\-\u2212]\d+(?:\.\d+)?\s*(?:points?|pp)\b"
                              rf"|\[\s*(?:{_SIGNED}\s*,\s*{_DEC}|{_DEC}\s*,\s*{_SIGNED})\s*\]")


def _load(name: str) -> dict:
    return json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())


def _code_lines(cell: dict) -> list[str]:
    return [ln for ln in "".join(cell["source"]).splitlines() if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_contract(name):
    path = REPO / "notebooks" / f"{name}.ipynb"
    cells = _load(name)["cells"]
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
            limit = 40 if "loop" in c.get("metadata", {}).get("tags", []) else 20
            assert len(_code_lines(c)) <= limit, f"a cell of {len(_code_lines(c))} lines belongs in tskd_utils"
    assert path.stat().st_size < 200_000


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_markdown_has_no_control_characters_and_no_typed_results(name):
    for i, c in enumerate(_load(name)["cells"]):
        if c["cell_type"] != "markdown":
            continue
        text = "".join(c["source"])
        assert not CONTROL.search(text), f"cell {i}: a control character (an unescaped backslash in a formula?)"
        prose = re.sub(r"`[^`]*`", "", text)  # code spans may name settings such as `0.999`
        typed = TYPED_RESULT.findall(prose) + TYPED_DIFFERENCE.findall(prose)
        assert not typed, f"cell {i}: results typed into prose {typed}: print them from a cell instead"


def test_the_checks_catch_what_they_should():
    assert CONTROL.search("$\bar\\alpha$")  # "\b" became a backspace
    assert TYPED_RESULT.findall("the FD is 0.311 against a floor of 0.011") == ["0.311", "0.011"]
    assert not TYPED_RESULT.findall("`ema_decay=0.995`, 5.7 M parameters, 0.5 s")
    assert TYPED_DIFFERENCE.findall("ts_kd - nosyn: -0.2 points [-1.7, +1.0]") == ["-0.2 points", "[-1.7, +1.0]"]
    assert TYPED_DIFFERENCE.findall("+2.8 pp, [+1.1, +5.7]") == ["+2.8 pp", "[+1.1, +5.7]"]
    assert not TYPED_DIFFERENCE.findall("intensities in [0, 1] or [-1, 1], 20 labeled images, lr 1e-3, step 5-10")


@pytest.mark.parametrize("name", WITH_CORE)
def test_the_method_core_is_readable_code_in_the_notebook(name):
    core = [c for c in _load(name)["cells"] if "core" in c.get("metadata", {}).get("tags", [])]
    assert len(core) == 1, "one cell tagged 'core' shows the stage's method"
    text = "".join(core[0]["source"])
    if name in WITH_LOOP:  # the loss is the package's one copy, shown where the loop uses it
        assert re.search(r"^source\(\w+\)", text, re.M)
    else:
        assert 10 <= len(_code_lines(core[0])) <= 20
        assert "def " in text  # a function the stage is given, not a call


@pytest.mark.parametrize("name", WITH_LOOP)
def test_the_training_loop_is_written_out_in_the_notebook(name):
    """Data, forward and loss, backward and step, a logged epoch with validation: the loop a reader can edit, over
    the package's resumable ``stage.epochs``."""
    loop = [c for c in _load(name)["cells"] if "loop" in c.get("metadata", {}).get("tags", [])]
    assert len(loop) == 1, "one cell tagged 'loop' holds the stage's training loop"
    text = "".join(loop[0]["source"])
    assert re.search(r"for epoch in \w+(\.\w+)*\.epochs\(", text)
    assert re.search(r"for .+ in .+batches\(", text) and "loss" in text
    assert "optimizer_step(" in text or ".backward()" in text
    assert "epoch.log(" in text
    assert "validate" in text or "no validation" in text  # the DDPM is judged by its images (notebook 03)
    assert len(_code_lines(loop[0])) <= 40


# ----------------------------------------------------------- badges, setup, environment, stages (issue 14)


def test_badges_and_setup_cells_come_from_the_one_place():
    """REPO_URL and RELEASE (tskd_utils.environment) make every badge and setup cell; the release is the version."""
    from tskd_utils import __version__, environment

    assert environment.RELEASE == f"v{__version__}"
    assert re.search(rf'^version = "{re.escape(__version__)}"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert environment.NOTEBOOKS == tuple(NOTEBOOKS)
    for name in NOTEBOOKS:
        cells = _load(name)["cells"]
        first, setup = "".join(cells[0]["source"]), "".join(cells[1]["source"])
        assert environment.badge_line(name) in first.splitlines(), f"{name}: badges differ from REPO_URL @ RELEASE"
        assert f"/blob/{environment.RELEASE}/notebooks/{name}.ipynb" in environment.badge_line(name)
        assert setup == environment.setup_cell_source(), f"{name}: the setup cell differs (make it with --sync)"
        # collapsed: a reader sees its title line only (Jupyter hides the source; Colab shows a form)
        assert cells[1]["metadata"].get("jupyter", {}).get("source_hidden") is True, name
        assert cells[1]["metadata"].get("cellView") == "form" and setup.startswith("# @title "), name
    readme = (REPO / "README.md").read_text().splitlines()
    assert all(badge in readme for badge in environment.readme_badges())
    assert environment.sync_notebooks(check=True) == []  # `python -m tskd_utils.environment --sync` is a no-op


def test_setup_cell_fails_fast_and_says_how_to_point_elsewhere():
    from tskd_utils import environment

    setup = environment.setup_cell_source()
    assert '"GIT_TERMINAL_PROMPT": "0"' in setup and "stdin=subprocess.DEVNULL" in setup and "check=True" in setup
    assert f'"{environment.REPO_URL}.git"' in setup and f'"TSKD_REF", "{environment.RELEASE}"' in setup
    assert "TSKD_REPO_URL" in setup.split("except", 1)[1] and "TSKD_REF" in setup.split("except", 1)[1]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_defaults_come_from_the_environment_and_a_config_cell_prints_it(name):
    nb = _load(name)
    assert (nb["nbformat"], nb["nbformat_minor"]) == (4, 5)
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids)
    cells = nb["cells"]
    i = next(k for k, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    params = "".join(cells[i]["source"])
    for line in ('env_default("profile", environment.default_profile())',
                 'env_default("data_root", "")', 'env_default("run_dir", "")', 'env_default("drive", False)'):
        assert line in params, f"{name}: parameters cell lacks {line}"
    # the folders are derived after the parameters cell, so that papermill's injected profile moves them
    after = "".join(cells[i + 1]["source"])
    assert after.startswith("run_dir, data_root = environment.resolve_dirs(profile, drive, run_dir, data_root)")
    assert "environment.print_config(profile, run_dir)" in after


@pytest.mark.parametrize("name, needs", [("04_distillation", ("ensure_teacher(run)", "ensure_synthetic(run)")),
                                         ("05_evaluation", ("ensure_teacher(", "ensure_students("))])
def test_notebooks_compute_missing_earlier_stages_before_using_them(name, needs):
    """Notebooks 04 and 05 run alone: the stages they read are ensured before the first cell that reads them."""
    sources = ["".join(c["source"]) for c in _load(name)["cells"] if c["cell_type"] == "code"]
    ensure = next(k for k, s in enumerate(sources) if "stages.ensure_" in s)
    assert all(n in sources[ensure] for n in needs)
    first_use = next(k for k, s in enumerate(sources) if "teacher_targets(" in s or "evaluate_run(" in s)
    assert ensure < first_use


def test_papermill_profile_alone_moves_the_default_folders(tmp_path, monkeypatch):
    """``papermill -p profile smoke`` without run_dir: the run folder follows the injected profile
    (runs/notebooks/smoke), not the default profile the parameters cell saw, and is never a sweep's folder."""
    import nbformat
    import papermill

    from tskd_utils import environment

    for var in ("TSKD_PROFILE", "TSKD_RUN_DIR", "TSKD_DATA_ROOT", "TSKD_DRIVE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TSKD_PLATFORM", "local")
    cells = _load("01_data_preparation")["cells"]
    i = next(k for k, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    nb = nbformat.v4.new_notebook(metadata=_load("01_data_preparation")["metadata"])
    nb.cells = [nbformat.v4.new_code_cell("".join(cells[i]["source"]), metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("".join(cells[i + 1]["source"])),
                nbformat.v4.new_code_cell("import json; print('DIRS=' + json.dumps([run_dir, data_root]))")]
    src, out = tmp_path / "params.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, str(src))
    papermill.execute_notebook(str(src), str(out), parameters={"profile": "smoke"}, kernel_name="python3",
                               cwd=str(tmp_path), progress_bar=False)
    text = "".join(o.get("text", "") for o in nbformat.read(str(out), as_version=4).cells[-1]["outputs"])
    run_dir, data_root = json.loads(text.split("DIRS=", 1)[1])
    assert run_dir == str(environment.REPO_ROOT / "runs" / "notebooks" / "smoke")
    assert data_root == str(environment.REPO_ROOT / "data")
    # a value given with -p still wins
    papermill.execute_notebook(str(src), str(out), parameters={"profile": "smoke", "run_dir": str(tmp_path / "r")},
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    text = "".join(o.get("text", "") for o in nbformat.read(str(out), as_version=4).cells[-1]["outputs"])
    assert json.loads(text.split("DIRS=", 1)[1])[0] == str(tmp_path / "r")
