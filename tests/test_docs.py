"""The documentation: the mkdocs site builds with warnings as errors, and README's links resolve.

The site build needs the `docs` extra (mkdocs-material, mkdocstrings, mkdocs-click); without it
that test skips, and CI (.ci/run) installs the extra and builds the site itself.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOCS_PLUGINS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_click")


def _missing_docs_tools() -> list[str]:
    missing = []
    for name in DOCS_PLUGINS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a dotted name whose parent is absent
            found = False
        if not found:
            missing.append(name)
    return missing


def _relative_links(markdown: str) -> list[str]:
    links = []
    for target in LINK.findall(markdown):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, ... and in-page anchors
        links.append(target.split("#", 1)[0])
    return links


def test_readme_relative_links_point_to_files():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = _relative_links(readme)
    assert links, "README.md links into docs/: expected relative links"
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_links_every_docs_page_it_names_in_the_nav():
    """README's documentation links go to pages that mkdocs.yml's nav builds."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in _relative_links(readme):
        if target.startswith("docs/") and target.endswith(".md"):
            assert target[len("docs/"):] in pages, f"{target} is linked from README.md but not in mkdocs.yml's nav"


def test_readme_test_command_is_extractable():
    """.ci/run runs the README's test command, found by its marker: keep the block intact."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme.split("<!-- test-command -->", 1)[1].splitlines()
    block = after[:after.index("```", 2) + 1]  # sed -n '/<!-- test-command -->/,/```$/p': to the closing fence
    commands = [line for line in block if line.startswith("python3 -m venv")]
    assert commands and "pytest" in commands[0], block


def test_quoted_result_files_exist():
    """Every benchmarks/results/ file the docs quote is committed (the figures come from them)."""
    missing = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for path in re.findall(r"benchmarks/results/[\w./*{},-]*[\w*}]", page.read_text(encoding="utf-8")):
            if not glob.glob(str(ROOT / path) + "*"):  # a file, a pattern, or a stem as in `--out STEM`
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing


def test_mkdocs_build_strict(tmp_path):
    missing = _missing_docs_tools()
    if missing:
        pytest.skip(f"the docs tools are not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for page in ("index.html", "architecture/index.html", "reference/cli/index.html", "reference/python/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    cli = (tmp_path / "site" / "reference/cli/index.html").read_text(encoding="utf-8")
    assert "--from-diffusers" in cli and "triton-repo" in cli  # generated from the click commands
    api = (tmp_path / "site" / "reference/python/index.html").read_text(encoding="utf-8")
    assert "sample_latents" in api  # generated from the docstrings
