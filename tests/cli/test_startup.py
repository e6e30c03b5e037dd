"""pipeline/startup.py: the command's process imports torch and torchvision without torch._dynamo,
and nothing that needs torch._dynamo loses it."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_extraction_imports_without_torch_dynamo_and_it_still_loads_on_use():
    out = _run("""
        import gc, sys
        from featcache.pipeline import startup
        startup.install()
        import featcache.pipeline.extraction.extract  # torch, torchvision, the loader, the backbones
        assert "torch._dynamo" not in sys.modules, "torch._dynamo was imported at start-up"
        assert "torch._dynamo.utils" not in sys.modules, "the stand-in was left behind"
        assert gc.isenabled() and startup._finder not in sys.meta_path
        assert gc.get_freeze_count() > 100_000  # torch's and torchvision's import-time objects
        import torch, torchvision
        boxes = [torch.tensor([[0.0, 0.0, 4.0, 4.0]])]
        assert torchvision.ops.roi_align(torch.ones(1, 1, 8, 8), boxes, 2).shape == (1, 1, 2, 2)
        ra = sys.modules["torchvision.ops.roi_align"]  # holds the function it imported from the stand-in
        assert ra.is_compile_supported("cpu") in (True, False)
        import torch._dynamo.utils as real
        assert real.__file__.endswith("utils.py") and callable(real.is_compile_supported)
        from torchvision.transforms import v2  # imports torch._dynamo (torch.compiler.disable): the real one
        assert callable(torch.compiler.disable(lambda: 1)) and v2.Resize(8) is not None
        print("ok")
    """)
    assert out.strip() == "ok"


def test_install_after_torchvision_is_imported_changes_nothing():
    out = _run("""
        import sys, torchvision
        from featcache.pipeline import startup
        startup.install()
        assert startup._finder not in sys.meta_path and "torch._dynamo" in sys.modules
        print("ok")
    """)
    assert out.strip() == "ok"


def test_the_cli_process_runs_a_command_and_exits_cleanly(tmp_path):
    """cli.main installs the finder and freezes the collector at the end; --help must still be clean."""
    out = subprocess.run([sys.executable, "-m", "featcache.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "extract" in out.stdout and out.stderr == ""


def test_quiet_library_logs_sets_pytorchs_own_switches_and_keeps_the_users(monkeypatch):
    """The effect on a real command's stderr is tested in test_never_destroy_extract.py."""
    import os

    from featcache.pipeline import startup

    monkeypatch.delenv("TORCH_LOGS", raising=False)
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")  # the user's choice wins
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in the CLI, before a command imports torch
    startup.quiet_library_logs()
    assert os.environ["TORCH_LOGS"] == "-all" and os.environ["TORCH_CPP_LOG_LEVEL"] == "INFO"
    monkeypatch.setenv("TORCH_LOGS", "+dynamo")
    startup.quiet_library_logs()
    assert os.environ["TORCH_LOGS"] == "+dynamo"
