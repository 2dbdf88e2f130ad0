"""MkDocs hooks: add the pages the code defines (docs/generate.py) to the site and fill the placeholders of the
hand-written pages. Runs inside ``mkdocs build``; nothing is written to docs/."""
from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel
from mkdocs.structure.nav import Section
from mkdocs.structure.pages import Page

sys.path.insert(0, str(Path(__file__).parent))
import generate  # noqa: E402

PLACEHOLDERS = {"<!-- vtr:support-matrix -->": generate.support_matrix_md,
                "<!-- vtr:vllm-matrix -->": generate.vllm_matrix_md}


def on_files(files, config):
    for path, text in generate.pages().items():
        file = File.generated(config, path, content=text)
        if path != "methods/index.md":
            file.inclusion = InclusionLevel.NOT_IN_NAV  # on_nav adds them under Methods
        files.append(file)
    return files


def on_nav(nav, config, files):
    section = next(item for item in nav.items if isinstance(item, Section) and item.title == "Methods")
    for name in generate.registry():
        page = Page(None, files.get_file_from_path(f"methods/{name}.md"), config)
        page.parent = section
        section.children.append(page)
    return nav


def on_page_markdown(markdown, page, config, files):
    for mark, make in PLACEHOLDERS.items():
        if mark in markdown:
            markdown = markdown.replace(mark, make())
    return markdown
