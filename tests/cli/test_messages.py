"""What the command line says: version, workflow order, and the one-line answers of the notebook issue."""
from __future__ import annotations

import re

from conftest import assert_one_line_error, invoke
from synthcache import run_cli

import featcache


def test_version_and_commands_in_workflow_order():
    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"featcache {featcache.__version__}"
    commands = invoke("--help").stdout.split("Commands:")[1]
    listed = re.findall(r"^  ([a-z-]+)\s", commands, re.MULTILINE)
    assert listed == ["extract", "info", "layers", "fit-head", "runs", "evaluate", "predict", "export", "finetune"]


def test_predict_with_a_cache_where_a_model_goes_says_so(split_cache, split_tree_ro):
    img = next(split_tree_ro.rglob("*.png"))
    line = assert_one_line_error(invoke("predict", split_cache, img), "is a feature cache, not a model")
    assert "fit-head" in line


def test_evaluate_on_a_cache_without_split_folders_reports_all_rows_and_a_per_class_table(flat_cache, tmp_path):
    run = tmp_path / "run"
    featcache.fit_heads(flat_cache, head="centroid", val_fraction=0.25, output=run)
    res = invoke("evaluate", run, flat_cache, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert "all_accuracy:" in res.stdout and "train_accuracy" not in res.stdout
    assert "all per class:" in res.stdout and "macro avg" in res.stdout


def test_runs_names_runs_trained_on_arrays(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 30)
    X = rng.normal(size=(60, 4)).astype(np.float32) + y[:, None]
    featcache.fit_heads((X, y), head="logreg", C=1.0, output=tmp_path / "exp" / "arrays")
    res = invoke("runs", tmp_path / "exp")
    assert res.exit_code == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("arrays"))
    assert "(arrays)" in line and "None" not in line and "logreg C=1" in line


def test_the_default_layer_answers_to_pre_logits(split_cache, tmp_path):
    """`featcache layers` names the classifier's input pre_logits; a default-layer cache records it as
    'input of <classifier>': fit-head --layers pre_logits reads it."""
    code, out, err = run_cli("fit-head", split_cache, "-o", tmp_path / "r", "--head", "centroid", "--layers",
                             "pre_logits", "--json", "--no-plots")
    assert code == 0, err


def test_fit_heads_progress_shows_passes_of_the_exact_probe(capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    X = rng.normal(size=(120, 6)).astype(np.float32) + np.eye(3, 6)[y]
    featcache.fit_heads((X, y), C=[0.1, 1.0], progress=True)
    err = capsys.readouterr().err
    assert "fit-head linear" in err and "pass" in err
    featcache.fit_heads((X, y), C=[0.1, 1.0])  # progress off by default: nothing on stderr
    assert capsys.readouterr().err == ""


def test_a_sigterm_whose_exception_was_dropped_is_raised_again_at_the_next_pass():
    """Python prints and drops an exception raised while a finalizer runs; a SIGTERM handled there
    must still stop training: heads/progress.tick raises it again."""
    import os
    import signal

    import pytest

    from featcache.pipeline.heads import progress
    from featcache.pipeline.signals import Terminated, sigterm_as_interrupt

    with sigterm_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        except Terminated:
            pass  # dropped, as a finalizer would
        with pytest.raises(Terminated):
            progress.tick()
    progress.tick()  # outside the block: nothing pending


def test_a_sigterm_arriving_in_a_finalizer_waits_for_the_next_pass():
    import signal
    import types

    import pytest

    from featcache.pipeline import signals
    from featcache.pipeline.heads import progress

    weakref_frame = types.SimpleNamespace(f_code=types.SimpleNamespace(co_name="remove", co_filename="/usr/lib/weakref.py"))
    with signals.sigterm_as_interrupt():
        signals._raise_terminated(signal.SIGTERM, weakref_frame)  # returns: nothing to drop
        with pytest.raises(signals.Terminated):
            progress.tick()
