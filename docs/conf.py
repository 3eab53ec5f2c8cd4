"""Sphinx configuration: Markdown pages (MyST) plus the API reference from docstrings."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "convbn"
author = "the convbn authors"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
master_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_typehints = "description"
autodoc_member_order = "bysource"
html_theme = "alabaster"
# Framework-specific modules are documented by hand: importing them would need the frameworks.
nitpicky = False
