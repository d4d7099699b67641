"""The documentation site builds in strict mode, and its generated options page follows the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocs_gen_files")

from snncompress.stages import stage_kinds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return site_dir


def _text(html_file: Path) -> str:
    return re.sub(r"<[^>]+>", " ", html_file.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_every_page_of_the_nav_is_built(site):
    assert (site / "index.html").is_file()
    for page in ["recipes", "methods/diet", "methods/stp", "methods/agc", "methods/crit",
                 "methods/tiny", "measuring", "deployment/nir", "performance", "reliability", "design",
                 "reference/report", "reference/options"]:
        assert (site / page / "index.html").is_file(), page


@pytest.mark.slow
def test_options_page_lists_every_stage_kind_and_its_options(site):
    html = (site / "reference" / "options" / "index.html").read_text(encoding="utf-8")
    text = _text(site / "reference" / "options" / "index.html")
    kinds = stage_kinds()
    assert len(kinds) >= 15
    for kind in kinds:  # one section per kind, headed by the kind
        assert f'<h3 id="{kind}">' in html, kind
    for section in ["recipe-top-level", "data", "model", "modelneuron"]:
        assert f'<h3 id="{section}">' in html, section
    # train_snn's section holds its epochs option, with its default of 1 and its lower limit
    section = text[text.index("TrainSNNOptions"):]
    assert re.search(r"\bepochs\s+int\s+1\s+&gt;= 1", section), section[:600]


@pytest.mark.slow
def test_api_reference_covers_every_module(site):
    api = site / "reference" / "api" / "snncompress"
    for source in (ROOT / "src" / "snncompress").rglob("*.py"):
        parts = source.relative_to(ROOT / "src" / "snncompress").with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        assert (api.joinpath(*parts) / "index.html").is_file(), source.name
    # docstrings are rendered, not only headings, and their Sphinx roles read as code
    base = (api / "stages" / "base" / "index.html").read_text(encoding="utf-8")
    assert "Decorator: register" in _text(api / "stages" / "base" / "index.html")
    assert "<code>stage_kinds</code>" in base and ":func:" not in base
