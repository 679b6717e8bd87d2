"""validation/e2e_copy.py runs end to end on a short epoch (a smoke test, in a subprocess: the
script pins every thread pool to one thread through the environment before its imports)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_e2e_copy_smoke(tmp_path):
    pytest.importorskip("torch")
    data = os.environ.get("NPBPTT_DATA")
    if not data or not (Path(data) / "copy_authors" / "copy_fixed.npz").exists():
        pytest.skip("needs NPBPTT_DATA with copy_authors/copy_fixed.npz")
    done = subprocess.run([sys.executable, str(ROOT / "validation" / "e2e_copy.py"), "--steps", "40",
                           "--K", "5", "--rounds", "1", "--gap", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "e2e_copy_float32.json").read_text())
    rows = {r["contender"]: r for r in result["rows"]}
    assert set(rows) == {"npbptt", "authors", "torch-detach"}
    assert result["info"]["tokens_per_epoch"] == 40 * 64
    for r in rows.values():
        assert r["s_per_epoch"] > 0 and len(r["s_rounds"]) == 1
        assert 0 < r["first_epoch_mean_loss"] < 10          # a cross-entropy over 6 symbols
    assert rows["authors"]["x_authors_tokens_per_s"] == 1.0
    assert "| npbptt |" in (tmp_path / "e2e_copy_float32.md").read_text()
