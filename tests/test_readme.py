"""The README's Python examples run and their assertions hold."""
import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_tour_with_assertions():
    assert any("vjp_state" in b and "assert" in b for b in BLOCKS)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, capsys):
    for mod in ("torch", "jax"):
        if re.search(rf"^import .*\b{mod}\b", BLOCKS[i], flags=re.M) and importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {})
    capsys.readouterr()
