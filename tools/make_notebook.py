"""Write a notebook from a list of cells: ``# %% [markdown]`` / ``# %%`` separated source.

    python tools/make_notebook.py notebooks/src/01_hookedvit.py notebooks/01_hookedvit.ipynb

The ``.py`` sources are the editable form; the ``.ipynb`` files (outputs empty) are what CI runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    chunks = src.read_text().split("# %%")
    for chunk in chunks[1:]:
        if chunk.startswith(" [markdown]"):
            body = chunk[len(" [markdown]"):].strip("\n")
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                             for line in body.splitlines())
            nb.cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(chunk.strip("\n")))
    return nb


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    nbformat.write(build(src), dst)
    print(f"wrote {dst}")
