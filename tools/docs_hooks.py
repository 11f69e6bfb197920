"""MkDocs hook: pages link to files outside docs/ by their paths in the repository, so the same
links work on the site and in the repository's Markdown view.

- ``../benchmarks/results/*.png``: the figures the benchmark scripts write, shown where they are
  written (no copies under docs/ to go stale when a benchmark is re-run);
- ``../ARCHITECTURE.md``: the code map, a page of the site.

The docstrings cross-reference with Sphinx roles (``:func:`gae```), which Markdown does not know:
the API reference shows them as the code span alone (``gae``; ``:meth:`~A.b``` as ``b``).
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files, InclusionLevel

FIGURES = "benchmarks/results"
PAGES = {"ARCHITECTURE.md": "architecture"}


ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")


class _SphinxRoles(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return [ROLE.sub(lambda m: "`" + (m[2].rsplit(".", 1)[-1] if m[1] else m[2]) + "`", line) for line in lines]


class SphinxRoles(Extension):
    def extendMarkdown(self, md) -> None:
        md.preprocessors.register(_SphinxRoles(md), "sphinx_roles", 40)


@event_priority(100)  # before mkdocstrings reads the Markdown extensions for the docstrings
def on_config(config):
    config.markdown_extensions.append(SphinxRoles())
    return config


def on_files(files: Files, config) -> Files:
    docs = Path(config["docs_dir"])
    root = docs.parent
    urls = config["use_directory_urls"]
    for figure in sorted((root / FIGURES).glob("*.png")):
        src = f"../{FIGURES}/{figure.name}"
        files.append(File(src, src_dir=str(docs), dest_dir=config["site_dir"], use_directory_urls=urls,
                          dest_uri=f"{FIGURES}/{figure.name}", inclusion=InclusionLevel.INCLUDED))
    for name, stem in PAGES.items():
        dest = f"{stem}/index.html" if urls else f"{stem}.html"
        files.append(File(f"../{name}", src_dir=str(docs), dest_dir=config["site_dir"], use_directory_urls=urls,
                          dest_uri=dest, inclusion=InclusionLevel.INCLUDED))
    return files
