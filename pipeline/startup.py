"""Process start-up and exit of the ``featcache`` command: less time before the first image and after the last.

On the 2-core development machine a 512-image ResNet-18 extraction spent 4.3 s importing torch and
torchvision and 1.25 s exiting, out of 19.1 s in all (bench/extract.py). Two savings, both for the
command's own process only (``cli.main`` calls ``install``; importing featcache as a library
changes nothing):

* **torch._dynamo is not imported on torchvision's behalf.** ``torchvision.ops.roi_align`` does
  ``from torch._dynamo.utils import is_compile_supported`` at import time, which loads all of
  torch._dynamo (1.9 s here) for one function that only roi_align calls. While torchvision
  imports, ``torch._dynamo.utils`` is a stand-in whose attributes import the real module on first
  use; it is removed as soon as torchvision is in, so ``torch.compile`` and ``roi_align`` import
  the real torch._dynamo when they run.
* **No cyclic garbage collection over import-time objects.** Importing torch and torchvision
  allocates ~500,000 objects, none of them garbage: the collector is paused while they import
  (0.4 s here), they are frozen (moved into the permanent generation) as each import ends, so the
  run's own full collections do not walk them again, and ``freeze`` does the same for everything
  alive at the end of a command, so the collection at interpreter exit does not walk it (1.3 ->
  0.4 s here).
  Reference counting, finalizers and atexit handlers run as usual.

It also keeps PyTorch's own log lines (``W1203 12:00:00.000000 123 torch/...] ...``, "No CUDA
runtime is found, ...") off the command's stderr, where a user expects featcache's one-line
messages: ``quiet_library_logs`` (the CLI calls it unless ``--verbose``).
"""
from __future__ import annotations

import gc
import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
from contextlib import contextmanager

_DYNAMO_UTILS = "torch._dynamo.utils"


def _stand_in() -> types.ModuleType:
    """A module that becomes the real torch._dynamo.utils on its first attribute access."""
    stub = types.ModuleType(_DYNAMO_UTILS)

    def __getattr__(attr: str):
        if attr.startswith("__"):  # inspect.getmodule asks every module for __file__: not a use
            raise AttributeError(attr)
        if sys.modules.get(_DYNAMO_UTILS) is stub:
            del sys.modules[_DYNAMO_UTILS]
        return getattr(importlib.import_module(_DYNAMO_UTILS), attr)

    def is_compile_supported(device_type):  # what torchvision imports; resolved when called
        return importlib.import_module(_DYNAMO_UTILS).is_compile_supported(device_type)

    stub.__getattr__ = __getattr__
    stub.is_compile_supported = is_compile_supported
    return stub


@contextmanager
def _fast_import(name: str):
    """gc paused while ``name`` imports; for torchvision also the torch._dynamo.utils stand-in."""
    stub = None
    if name == "torchvision" and _DYNAMO_UTILS not in sys.modules and "torch._dynamo" not in sys.modules:
        stub = sys.modules[_DYNAMO_UTILS] = _stand_in()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        # what the import left alive lives as long as the process: into the permanent generation,
        # or every full collection of the run walks those ~300,000 objects again (a reference
        # cycle the import left behind is kept too; a failed import is not frozen)
        gc.freeze()
    finally:
        if enabled:
            gc.enable()
        if stub is not None and sys.modules.get(_DYNAMO_UTILS) is stub:
            del sys.modules[_DYNAMO_UTILS]


class _Finder(importlib.abc.MetaPathFinder):
    """Finds torch and torchvision once each, through the normal finders, and runs their import
    under _fast_import."""

    def __init__(self):
        self.pending = {"torch", "torchvision"}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        uninstall()  # the normal finders find it; this one comes back for what is still pending
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            if self.pending:
                sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_fast(module):
            with _fast_import(fullname):
                exec_module(module)

        spec.loader.exec_module = exec_fast  # this spec's own loader instance
        return spec


_finder = _Finder()


def install() -> None:
    """Make the coming imports of torch and torchvision (those not done yet) the fast ones."""
    _finder.pending -= set(sys.modules)
    if _finder.pending and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def freeze() -> None:
    """Before the command returns: what is alive now lives until exit; spare the exit collection it."""
    gc.freeze()


def quiet_library_logs() -> None:
    """Only errors from PyTorch's loggers reach stderr, through PyTorch's own settings: its Python
    logs (``TORCH_LOGS=-all``: every ``torch.*`` logger at ERROR) and its C++ log
    (``TORCH_CPP_LOG_LEVEL=ERROR``). Both are read when torch is imported, which the CLI does only
    inside a command, after this runs; a setting the user exported is left as it is. Python
    warnings are not touched: the CLI shows each as one ``featcache: warning:`` line.
    """
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if "torch" not in sys.modules:  # imported already (a test runner): its loggers are the host's business
        os.environ.setdefault("TORCH_LOGS", "-all")
