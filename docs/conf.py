"""Sphinx configuration: Markdown pages (MyST), the API reference from docstrings and the CLI
reference from the argparse parser itself (``convbn.cli.build_parser``), so that it cannot fall
behind the code."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "convbn"
author = "the convbn authors"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinxarg.ext"]
source_suffix = {".md": "markdown"}
master_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_typehints = "description"
autodoc_member_order = "bysource"
# furo: a content column that long code blocks scroll within (the page itself never scrolls
# sideways), light and dark modes, and a search box.
html_theme = "furo"
html_title = "convbn"
html_static_path = ["_static"]
# Framework-specific modules are documented by hand: importing them would need the frameworks.
nitpicky = False
