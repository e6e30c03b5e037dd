"""The package as users install it: one import name, storage below the pipeline, click only in the CLI."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO

PACKAGE_FILES = ("pyproject.toml", "README.md", "__init__.py", "cli.py", "pipeline", "cache")


def _imports(path: Path) -> set[str]:
    """Top two levels of every module a file imports (``featcache.pipeline``, ``click``, ...)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        out |= {".".join(n.split(".")[:2]) for n in names}
    return out


def test_wheel_has_exactly_one_top_level_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in PACKAGE_FILES:  # build from a copy: no build/ or egg-info left in the checkout
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
    for junk in src.rglob("__pycache__"):
        shutil.rmtree(junk)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("featcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"featcache"}
    for module in ("featcache/cli.py", "featcache/__init__.py", "featcache/cache/store.py",
                   "featcache/pipeline/heads/fit.py", "featcache/pipeline/extraction/extract.py"):
        assert module in names
    assert not any(n.startswith(("featcache/tests", "featcache/bench", "featcache/examples")) for n in names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "featcache = featcache.cli:main" in entry


def test_storage_never_imports_the_pipeline():
    for path in (REPO / "cache").glob("*.py"):
        assert not {m for m in _imports(path) if m.startswith("featcache.pipeline")}, path


def test_only_the_cli_imports_click():
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "cache").rglob("*.py"), REPO / "__init__.py"]:
        assert "click" not in {m.split(".")[0] for m in _imports(path)}, path
    assert "click" in _imports(REPO / "cli.py")


def test_import_featcache_costs_no_torch_and_resolves_the_api_lazily():
    code = ("import sys, featcache; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted(featcache.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    for name in ("extract", "open_cache", "fit_heads", "load", "HeadClassifier", "FeatcacheError"):
        assert name in out.stdout


def test_a_cache_folder_in_the_working_directory_does_not_shadow_ours(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "__init__.py").write_text("raise ImportError('the wrong cache package')\n")
    (tmp_path / "pipeline.py").write_text("raise ImportError('the wrong pipeline module')\n")
    code = "import featcache.cache.store, featcache.pipeline.config; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
