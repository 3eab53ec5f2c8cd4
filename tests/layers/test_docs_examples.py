"""The complete examples on the framework pages of the docs run and their checks hold."""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import pytest

from tests.conftest import need, require_backend

DOCS = Path(__file__).resolve().parents[2] / "docs"

# Each page's first Python block is its complete example; the frameworks it needs.
PAGES = {
    "torch.md": ("torch", "tensorflow"),
    "keras.md": ("torch", "tensorflow"),
    "flax.md": ("torch", "jax"),
}
# Sections whose first Python block is a complete example too (None: the page's first block).
SECTIONS = (None, "Loading a checkpoint into your own model")


def _example(page: str, section: str | None = None) -> str:
    text = (DOCS / page).read_text()
    if section is not None:
        assert f"\n## {section}\n" in text, f"{page} has no section {section!r}"
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{page} has no Python example" + (f" in {section!r}" if section else "")
    return blocks[0]


@pytest.mark.slow
@pytest.mark.parametrize("section", SECTIONS, ids=["first", "load_into"])
@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_example_runs(page, section, tmp_path, monkeypatch):
    for name in PAGES[page]:
        require_backend(name)
    if "tensorflow" in PAGES[page]:
        if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
            pytest.skip("the example uses Keras's TensorFlow backend")
        need("keras")
    if "jax" in PAGES[page]:
        need("flax")
    monkeypatch.chdir(tmp_path)  # the Keras example saves a file
    script = tmp_path / f"example_{page.replace('.md', '')}.py"
    script.write_text(_example(page, section))
    runpy.run_path(str(script), run_name="docs_example")  # a real module: Flax modules are dataclasses
