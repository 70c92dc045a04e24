"""Sphinx configuration of pykd's API reference (``make docs``).

The Python API comes from the installed package's numpydoc docstrings
(autodoc + napoleon); the Fortran modules are documented by FORD
(docs/api/fortran.md), whose HTML ``make docs`` puts under ``fortran/``.
Only the pages under docs/api/ are Sphinx sources; the other Markdown files
of docs/ are read on GitHub.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "meson.build"), encoding="utf-8") as fh:
    release = re.search(r"^project\([^)]*?version:\s*'([^']+)'", fh.read(), re.M | re.S).group(1)
version = release

project = "pykd"
author = "the pykd developers"
copyright = "2026, the pykd developers"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
root_doc = "api/index"
include_patterns = ["api/**"]
exclude_patterns = ["api/fortran.md"]
source_suffix = {".rst": "restructuredtext"}

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
napoleon_use_ivar = True  # an "Attributes" section must not describe a field twice
nitpicky = False
# Docstring types such as "float32 (n, n_features)" are prose, not references:
# do not report a word in them that names several attributes.
suppress_warnings = ["ref.python"]

html_theme = "alabaster"
html_title = f"pykd {release} API reference"
