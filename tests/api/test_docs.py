"""The documentation runs: every ```python block of README.md and docs/*.md is executed on generated
data, every relative link between the files resolves, and docs/usage.md lists exactly the CLI's flags.

Blocks of one file run in order, sharing one namespace, in a fresh folder holding what the examples
name: ``photos/`` (docs/make_photos.py, 36 images where the docs show 192), ``photos.h5``
(EfficientNet-Lite0, as the docs extract it), ``runs/linear`` (fit-head's defaults) and
``photos.pt2`` (its export). A block with ``>>>`` lines runs as a doctest (ELLIPSIS,
NORMALIZE_WHITESPACE); a ``# -> ...`` comment shows what a real run printed and is not checked
(accuracies and timings differ on the smaller folder). A block that must not run here (torchrun, a
download) is written as ```bash or ```text.
"""
from __future__ import annotations

import doctest
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # tests/api/ -> the repository
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
SMALL = dict(train=6, val=3, test=3)  # images per class and split: 36 in all, EfficientNet-Lite0 in ~3 s


def python_blocks(md: Path) -> list[tuple[int, str]]:
    """(first code line number, code) of each ```python block of a Markdown file, in order."""
    text = md.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == "python"]


def _make_photos():
    spec = importlib.util.spec_from_file_location("make_photos", REPO / "docs" / "make_photos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_photos


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder with photos/, photos.h5, runs/linear and photos.pt2, built once with featcache itself."""
    import featcache
    from featcache.pipeline.use.export import run_export

    base = tmp_path_factory.mktemp("docs-world")
    _make_photos()(base / "photos", **SMALL)
    featcache.extract(base / "photos", base / "photos.h5", backbone="efficientnet_lite0")
    featcache.fit_heads(base / "photos.h5", output=base / "runs" / "linear", plots=False)
    run_export(str(base / "runs" / "linear"), str(base / "photos.pt2"))
    return base


def run_block(code: str, line: int, md: Path, ns: dict) -> None:
    """Execute one block in ``ns``; tracebacks and doctest reports name the Markdown file and line."""
    name = f"{md.relative_to(REPO)}:{line}"
    if re.search(r"^\s*>>> ", code, re.MULTILINE):
        test = doctest.DocTestParser().get_doctest(code, ns, name, str(md), line - 1)
        report: list[str] = []
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        result = runner.run(test, out=report.append, clear_globs=False)
        ns.update(test.globs)
        assert result.failed == 0, "".join(report)
    else:
        exec(compile("\n" * (line - 1) + code, str(md), "exec"), ns)  # line numbers are the file's


WITH_CODE = [md for md in DOCS if python_blocks(md)]


@pytest.mark.parametrize("md", WITH_CODE, ids=[str(md.relative_to(REPO)) for md in WITH_CODE])
def test_python_examples_run(md: Path, world: Path, tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    shutil.copytree(world, work)  # copy2: mtimes kept, so photos.h5 is up to date for photos/
    monkeypatch.chdir(work)
    ns: dict = {"__name__": "__docs__"}
    for line, code in python_blocks(md):
        run_block(code, line, md, ns)


def test_readme_is_a_front_door() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "make demo" in text and "make test" in text
    assert len(python_blocks(REPO / "README.md")) >= 2  # the quickstart and the estimator examples run


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = FENCE.sub("", md.read_text(encoding="utf-8"))
    return {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, re.MULTILINE)}


def test_relative_links_resolve() -> None:
    broken, checked = [], 0
    for md in DOCS:
        text = FENCE.sub("", md.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            checked += 1
            file, _, anchor = target.partition("#")
            path = (md.parent / file).resolve() if file else md
            if not path.exists():
                broken.append(f"{md.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{md.name}: {target} (no such heading)")
    assert not broken, broken
    assert checked >= len(DOCS)  # the README links into docs/, and each page links back


def _documented_flags() -> dict[str, set[str]]:
    """docs/usage.md: command -> the --flags in the first column of its option table."""
    flags: dict[str, set[str]] = {}
    command = None
    for line in (REPO / "docs" / "usage.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## `featcache ([a-z-]+)", line)
        if heading:
            command = heading.group(1)
            flags[command] = set()
        elif command and line.startswith("| `-"):
            flags[command] |= set(re.findall(r"--[A-Za-z0-9][A-Za-z0-9-]*", line.split("|")[1]))
    return flags


def test_usage_lists_every_flag_of_every_command() -> None:
    from featcache.cli import main

    documented = _documented_flags()
    assert set(documented) == set(main.commands), "one '## `featcache COMMAND`' section per command"
    for name, command in main.commands.items():
        real = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} - {"--help"}
        assert documented[name] == real, (name, "missing:", real - documented[name], "stale:", documented[name] - real)
