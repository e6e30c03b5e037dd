"""Issue 24 "Never destroy what isn't ours", extract / cache / CLI side (and issue 22 item 9, lock files).

One section per item of the issue; each test runs the real command (in-process, or as a process
where signals, capabilities or the library's own stderr are the point) and checks what is on disk.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import FAST, REPO, CliResult, assert_one_line_error, invoke, write_class_images
from synthcache import write_cache

from featcache.cache.errors import CacheError
from featcache.cache.lock import cache_lock, lock_path_for
from featcache.cache.store import read_cache

BASE = [*FAST, "--device", "cpu", "--workers", "0"]
PY = sys.executable
CLI = str(REPO / "cli.py")


def extract(root, out, *extra) -> CliResult:
    return invoke("extract", root, "-o", out, *BASE, *extra)


def ok(res: CliResult) -> dict:
    assert res.exit_code == 0 and res.exception is None, res.stderr
    return res.json() if res.stdout.lstrip().startswith("{") else {}


def lock_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".lock"))


def digits(root: Path, classes: int = 4, per_class: int = 5) -> Path:
    """ROOT/digit_<k>/img_XXX.{png,jpg}: the layout of the issue's report (4 classes)."""
    rng = np.random.default_rng(7)
    for k in range(classes):
        write_class_images(root / f"digit_{k}", (40 + 50 * k, 120, 220 - 50 * k), per_class, rng)
    return root


# ---- 3. a class folder that is a symlink to another class ---------------------------------------------

def test_3_class_folder_linked_to_another_class_is_one_line_and_the_cache_stays(tmp_path):
    root = digits(tmp_path / "digits")
    out = tmp_path / "c.h5"
    assert ok(extract(root, out, "--json"))["n_images"] == 20
    before = out.read_bytes()
    os.symlink("digit_1", root / "digit_9")  # both names used to vanish: exit 0, "removed 5", 3 classes
    line = assert_one_line_error(extract(root, out), "'digit_1'", "'digit_9'", "one folder", "two labels")
    assert str(root / "digit_1") in line
    assert out.read_bytes() == before  # the existing cache is not rewritten without the two classes
    assert_one_line_error(extract(root, tmp_path / "fresh.h5"), "'digit_9'")
    assert not (tmp_path / "fresh.h5").exists() and lock_files(tmp_path) == []


# ---- 8. locks and writes through the real path; issue 22 item 9: no lock file left -------------------

def test_8_symlinked_cache_is_locked_and_written_through_and_stays_a_symlink(small_tree, tmp_path):
    real, link = tmp_path / "real.h5", tmp_path / "link.h5"
    ok(extract(small_tree, real))
    link.symlink_to(real.name)
    with cache_lock(real):  # a writer through the real path excludes one through the link
        assert_one_line_error(extract(small_tree, link, "--overwrite", "--pool", "max"), "another featcache extract")
    write_class_images(small_tree / "train" / "red", (200, 40, 40), 1, np.random.default_rng(3), start=90)
    s = ok(extract(small_tree, link, "--json"))
    assert (s["extracted"], s["reused"]) == (1, 15)
    assert link.is_symlink() and os.readlink(link) == real.name  # still a link, not a regular file
    assert read_cache(real).n_rows == 16  # the real cache got the new row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "link.h5", "real.h5"]


def test_lock_files_never_outlive_a_command(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    ok(extract(small_tree, out))
    assert lock_files(tmp_path) == []
    assert_one_line_error(extract(small_tree, out, "--pool", "max"), "different configuration")  # fails holding it
    assert lock_files(tmp_path) == []
    hold = ("import sys\nfrom featcache.cache.lock import cache_lock\n"
            "with cache_lock(sys.argv[1]):\n print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([PY, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock, the file stays
        holder.wait(timeout=30)
        assert lock_files(tmp_path) == [".c.h5.lock"]
        ok(extract(small_tree, out))  # takes the dead writer's file over, and removes it
        assert lock_files(tmp_path) == []
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_lock_file_removed_by_its_holder_is_never_locked_by_a_late_opener(tmp_path, monkeypatch):
    """The race the removal opens: a writer opens the lock file, its holder removes it and lets go,
    the writer's flock then succeeds on an inode no one else will open. It must start over."""
    target = tmp_path / "c.h5"
    lock = lock_path_for(target)
    lock.write_text("")
    stale = os.open(lock, os.O_RDWR)
    lock.unlink()  # what the previous holder did on release
    real_open, opened = os.open, []

    def late_open(path, flags, mode=0o777, **kw):
        if Path(path) == lock and not opened:  # the first open returns the descriptor of the removed file
            opened.append(path)
            return os.dup(stale)
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", late_open)
    with cache_lock(target):
        monkeypatch.setattr(os, "open", real_open)
        assert opened and lock.exists()
        other = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the lock held is the one on the file the name refers to
                import fcntl
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        with pytest.raises(CacheError, match="another featcache extract"):
            with cache_lock(target):
                pass
    os.close(stale)
    assert not lock.exists()


# ---- 7. SIGTERM ---------------------------------------------------------------------------------------

def test_7_sigterm_during_extract_with_workers_is_one_line_143_and_resumable(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    env = {**os.environ, "FEATCACHE_TEST_CRASH_AFTER_BATCHES": "2", "FEATCACHE_TEST_CRASH_SIGNAL": "15"}
    env.pop("FEATCACHE_DEBUG", None)
    p = subprocess.run([PY, CLI, "extract", str(small_tree), "-o", str(out), *FAST, "--device", "cpu",
                        "--workers", "2", "--batch-size", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 143, p.stderr
    assert p.stderr.splitlines() == ["featcache: error: interrupted; re-run the same command to resume"]
    assert not out.exists() and lock_files(tmp_path) == []
    with cache_lock(out):  # at once: no orphaned decode worker holds it
        pass
    s = ok(extract(small_tree, out, "--batch-size", "2", "--json"))
    assert s["resumed_batches"] == 2 and s["n_images"] == 15


def test_7_sigterm_during_fit_head_is_one_line_143_and_leaves_nothing(tmp_path):
    cache = write_cache(tmp_path / "c.h5", {"train": 200, "val": 20, "test": 20})
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "FEATCACHE_DEBUG"}
    proc = subprocess.Popen([PY, CLI, "fit-head", str(cache), "-o", str(run), "--head", "mlp", "--epochs", "100000",
                             "--patience", "0", "--no-plots", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = lock_path_for(run)
        for _ in range(3000):  # training starts once the run folder is locked (a minute at most)
            if lock.exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert err.splitlines() == ["featcache: error: interrupted"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]  # no run, no .run.tmp-PID, no lock


def test_decode_workers_die_with_their_parent():
    from featcache.pipeline.extraction.loader import _worker_init

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a decode worker, as the DataLoader forks it
        try:
            _worker_init(os.getppid(), 0)
            sig = ctypes.c_int(-1)
            ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
            os.write(w, str(sig.value).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 16) == str(int(signal.SIGKILL)).encode()
    finally:
        os.waitpid(pid, 0)
        os.close(r)


FORK_SCRIPT = """
import os, sys, time
from featcache.cache.lock import cache_lock
with cache_lock(sys.argv[1]):
    pid = os.fork()
    if pid == 0:  # a child that outlives its parent, as an orphaned decode worker did
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)  # not the test's pipes: it would wait for the child to close them
        os.dup2(null, 2)
        time.sleep(120)
        os._exit(0)
    print(pid, flush=True)
    os.kill(os.getpid(), 9)  # no cleanup: the lock file stays, only descriptors keep the flock
"""


def test_a_forked_child_never_keeps_the_lock_of_its_dead_parent(tmp_path):
    out = tmp_path / "c.h5"
    p = subprocess.run([PY, "-c", FORK_SCRIPT, str(out)], capture_output=True, text=True, timeout=120)
    child = int(p.stdout)
    try:
        assert p.returncode == -9 and lock_files(tmp_path) == [".c.h5.lock"]
        os.kill(child, 0)  # the child is alive (it raises if not)
        with cache_lock(out):  # its inherited descriptor was closed at fork: the lock is free
            pass
        assert lock_files(tmp_path) == []
    finally:
        os.kill(child, signal.SIGKILL)


# ---- 9. late failures ---------------------------------------------------------------------------------

def test_9_name_too_long_fails_before_any_work(small_tree, tmp_path, monkeypatch):
    import featcache.pipeline.extraction.extract as ex

    monkeypatch.setattr(ex, "open_source", lambda *a, **k: pytest.fail("discovery ran before the name was checked"))
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "c" * (limit - 12) + ".h5"  # the 246 bytes on a 255-byte filesystem
    extra = len(f".{name}.tmp-{os.getpid()}") - len(name)
    line = assert_one_line_error(extract(small_tree, tmp_path / name), "too long", f"at most {limit - extra} bytes")
    assert str(len(name)) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    monkeypatch.undo()
    longest = "c" * (limit - extra - 3) + ".h5"  # the longest name the message allows works
    assert ok(extract(small_tree, tmp_path / longest, "--json"))["n_images"] == 15


def _unprivileged() -> list[str]:
    """A command prefix that runs without root's capabilities (or nothing when not root)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv is missing: cannot drop the capability to write anywhere")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


def test_9_read_only_output_folder_is_one_line_before_any_work(small_tree, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    p = subprocess.run([*_unprivileged(), PY, CLI, "extract", str(small_tree), "-o", str(ro / "c.h5"), *BASE],
                       capture_output=True, text=True, timeout=300)
    ro.chmod(0o755)
    res = CliResult(p.returncode, p.stdout, p.stderr)
    assert_one_line_error(res, "output folder is not writable", str(ro), "permission denied")
    assert list(ro.iterdir()) == []


# ---- 10. messages -------------------------------------------------------------------------------------

def _break(attr: str):
    def edit(f: h5py.File) -> None:
        if attr == "schema_version":
            f.attrs["schema_version"] = "one"
        elif attr == "json_attrs":
            f.attrs["json_attrs"] = '["class_names", '
        else:
            del f.attrs["class_names"]
    return edit


@pytest.mark.parametrize("attr", ["schema_version", "json_attrs", "class_names"])
def test_10_malformed_cache_attributes_are_one_line_naming_them(tmp_path, attr):
    cache = write_cache(tmp_path / "c.h5", {"train": 5, "val": 2, "test": 2})
    with h5py.File(cache, "a") as f:
        _break(attr)(f)
    for args in (("info", cache), ("fit-head", cache, "-o", tmp_path / "run", "--head", "logreg", "--C", "1")):
        line = assert_one_line_error(invoke(*args), "corrupt metadata", attr, "--overwrite")
        assert "internal error" not in line


def test_10_weights_that_do_not_fit_name_the_tensor(small_tree, tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    torch.save(state, tmp_path / "ten_classes.pt")
    line = assert_one_line_error(invoke("extract", small_tree, "-o", tmp_path / "c.h5", "--backbone", "resnet18",
                                        "--weights", tmp_path / "ten_classes.pt"), "does not fit resnet18")
    assert "fc.weight: file (10, 512), model (1000, 512)" in line


def test_10_incomplete_cache_advice_works(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    ok(extract(small_tree, out))
    with h5py.File(out, "a") as f:
        f.attrs["complete"] = False
    assert_one_line_error(invoke("info", out), "incomplete", "re-extract it with --overwrite")
    line = assert_one_line_error(extract(small_tree, out), "incomplete")
    assert line.count("--overwrite") == 1  # the advice, once; following it works:
    assert ok(extract(small_tree, out, "--overwrite", "--json"))["n_images"] == 15


def test_10_paths_in_messages_are_quoted(tmp_path):
    (tmp_path / "A").mkdir()
    line = assert_one_line_error(extract(f"{tmp_path}/A ", tmp_path / "c.h5"), "image folder not found")
    assert repr(f"{tmp_path}/A ") in line


def test_10_nothing_is_compiled_when_no_image_is_usable(tmp_path, monkeypatch):
    for k in range(3):
        folder = tmp_path / "junk" / f"class{k}"
        folder.mkdir(parents=True)
        (folder / "a.png").write_text("not an image")
    calls = []
    monkeypatch.setattr(torch, "compile", lambda *a, **k: calls.append(a) or pytest.fail("torch.compile ran"))
    assert_one_line_error(extract(tmp_path / "junk", tmp_path / "c.h5", "--compile", "on"),
                          "none of the 3 image files could be used")
    assert calls == []


LOGGING_SCRIPT = """
import logging, sys
from featcache import cli
import featcache.cache.info as info
real = info.cache_info
def noisy(path):
    import torch  # a command imports torch only once it runs, as every featcache command does
    logging.getLogger("torch._dynamo.convert_frame").warning("raw library log line")
    return real(path)
info.cache_info = noisy
sys.argv = ["featcache", *sys.argv[1:]]
cli.main()
"""


def test_10_library_log_lines_only_with_verbose(tmp_path):
    cache = write_cache(tmp_path / "c.h5", {"train": 3, "val": 1, "test": 1})
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_CPP_LOG_LEVEL")}
    quiet = subprocess.run([PY, "-c", LOGGING_SCRIPT, "info", str(cache)], env=env, capture_output=True, text=True,
                           timeout=300)
    loud = subprocess.run([PY, "-c", LOGGING_SCRIPT, "--verbose", "info", str(cache)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert quiet.stderr == "" and quiet.stdout == loud.stdout
    assert "raw library log line" in loud.stderr and loud.stderr.startswith("W")  # PyTorch's own format


def test_10_read_only_cache_is_refused_not_replaced(small_tree, tmp_path):
    out = tmp_path / "c.h5"
    ok(extract(small_tree, out))
    out.chmod(0o444)
    before = out.read_bytes()
    assert ok(extract(small_tree, out, "--json"))["up_to_date"]  # nothing to write: answered, untouched
    write_class_images(small_tree / "train" / "red", (200, 40, 40), 1, np.random.default_rng(4), start=90)
    for extra in ((), ("--overwrite", "--pool", "max")):
        assert_one_line_error(extract(small_tree, out, *extra), "read-only", "0444", "chmod u+w")
    assert out.read_bytes() == before and stat.S_IMODE(out.stat().st_mode) == 0o444
    assert lock_files(tmp_path) == [] and not list(tmp_path.glob("*.tmp-*"))


# ---- 6. a full disk while PyTorch writes ----------------------------------------------------------------

def test_6_torch_save_on_a_full_disk_is_recognised_and_buffered_writes_say_no_space(small_fs):
    from featcache.cache.atomic import is_disk_full, write_buffered

    mnt = small_fs(256)
    big = {"w": torch.zeros(200_000)}  # 0.8 MB into 256 KiB
    with pytest.raises(RuntimeError) as e:
        torch.save(big, str(mnt / "direct.pt"))  # PyTorch's own text: "enforce fail at inline_container.cc"
    assert is_disk_full(e.value), str(e.value)
    mnt = small_fs(256)  # a fresh one: the failed writer may still hold its file open
    (mnt / "head.pt").write_bytes(b"previous")
    with pytest.raises(CacheError, match=r"^no space left on .* \(needed about 0\.8 MB"):
        write_buffered(mnt / "head.pt", lambda f: torch.save(big, f))
    assert (mnt / "head.pt").read_bytes() == b"previous" and sorted(p.name for p in mnt.iterdir()) == ["head.pt"]


JIT_SCRIPT = """
import sys, torch
from featcache.cache.atomic import write_buffered
from featcache.cache.errors import CacheError
m = torch.jit.trace(torch.nn.Linear(400, 400), torch.randn(2, 400))
try:
    write_buffered(sys.argv[1], lambda f: torch.jit.save(m, f))
except CacheError as e:
    print(e)
"""


def test_6_torchscript_export_to_a_full_disk_cannot_abort(small_fs):
    """torch.jit.save straight to a file on a full disk ends in a C++ terminate (exit 134)."""
    mnt = small_fs(256)
    p = subprocess.run([PY, "-W", "ignore", "-c", JIT_SCRIPT, str(mnt / "model.pt")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"no space left on {mnt}") and list(mnt.iterdir()) == []
