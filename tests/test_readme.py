"""The README's Python examples run and their assertions hold."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
# the examples moved from the README to docs/ run too
DOC_BLOCKS = [b for d in sorted((ROOT / "docs").glob("*.md"))
              for b in re.findall(r"```python\n(.*?)```", d.read_text(encoding="utf-8"), flags=re.S)]


def test_readme_has_the_tour_with_assertions():
    assert any("vjp_state" in b and "assert" in b for b in BLOCKS)


@pytest.mark.parametrize("i", range(len(BLOCKS + DOC_BLOCKS)))
def test_readme_python_block_runs(i, capsys):
    block = (BLOCKS + DOC_BLOCKS)[i]
    for mod in ("torch", "jax"):
        if re.search(rf"^import .*\b{mod}\b", block, flags=re.M) and importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    where = f"README.md block {i}" if i < len(BLOCKS) else f"docs block {i - len(BLOCKS)}"
    exec(compile(block, where, "exec"), {})
    capsys.readouterr()
