"""The package as a user installs it: a wheel built from the repository holds every module of
the source tree (subpackages and the top-level kernels/ folder as npbptt.kernels), the py.typed
marker and the console script; CITATION.cff cites the paper."""
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _source_modules():
    """Every .py module the installed package must hold, named as in a wheel."""
    out = {f"npbptt/{p.relative_to(ROOT / 'npbptt').as_posix()}"
           for p in (ROOT / "npbptt").rglob("*.py") if "__pycache__" not in p.parts}
    out |= {f"npbptt/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src")          # a clean copy: no build/ left from earlier builds
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("npbptt", "kernels"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("npbptt-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_holds_every_module_and_the_typed_marker(wheel):
    names = set(wheel.namelist())
    missing = sorted(_source_modules() - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    assert "npbptt/py.typed" in names
    assert {"npbptt/online/__init__.py", "npbptt/tasks/__init__.py",
            "npbptt/kernels/cpu.py"} <= names


def test_wheel_metadata_has_the_console_script_and_extras(wheel):
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "npbptt = npbptt.cli:main" in wheel.read(ep).decode()
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    text = wheel.read(meta).decode()
    assert "Requires-Python: >=3.10" in text
    assert 'Requires-Dist: torch==2.13.0; extra == "torch"' in text


def test_citation_cites_the_paper():
    text = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert text.startswith("cff-version: 1.2.0")
    assert "preferred-citation:" in text
    assert "Adaptively Truncating Backpropagation Through Time to Control Gradient Bias" in text
    for name in ("Aicher", "Foti", "Fox"):
        assert f"family-names: {name}" in text
