"""The worked example examples/compress_snntorch.py (issue 26): an snnTorch network, compressed here, goes back to
snnTorch with the same predictions and runs in the integer C engine; the import is exact, so the imported model's
accuracy is snnTorch's own."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

pytest.importorskip("snntorch", reason="snnTorch is not installed (pip install snntorch)")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compress_snntorch.py"


@pytest.mark.slow
def test_compress_snntorch_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compress_snntorch", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "back in snnTorch" in printed and "footprint (bytes)" in printed
    assert result["baseline"]["accuracy"] == pytest.approx(result["trained_accuracy"], abs=1e-9)  # same images
    assert result["agree"] == result["images"] == 2000                    # snnTorch predicts what snncompress does
    assert result["accuracy_back"] == pytest.approx(result["final"]["accuracy"], abs=1e-9)
    assert result["final"]["footprint_bytes"] < result["baseline"]["footprint_bytes"] / 5
    assert result["final"]["accuracy"] >= result["baseline"]["accuracy"] - 0.02  # the sweep's 1-point tolerance
    if shutil.which("cc"):  # the compressed graph network in the integer C engine: 2000 of 2000 when measured
        assert result["agree_c"] >= result["images"] - 2 and "in C (integer-only engine)" in printed
    else:
        assert result["agree_c"] is None and "C engine step was skipped" in printed
