"""export: one file, loadable without featcache, whose outputs equal predict's."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_one_line_error, invoke

LOADER = r"""
import json, sys
import numpy as np, torch
path, images = sys.argv[1], sys.argv[2]
assert "pipeline" not in sys.modules and "cache" not in sys.modules
x = torch.from_numpy(np.load(images))
if path.endswith(".pt2"):
    extra = {"featcache.json": ""}
    m = torch.export.load(path, extra_files=extra).module()
else:
    extra = {"featcache.json": ""}
    m = torch.jit.load(path, _extra_files=extra)
with torch.no_grad():
    p = m(x)
print(json.dumps({"probs": p.tolist(), "meta": json.loads(extra["featcache.json"])}))
"""


@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
def test_export_equals_predict_without_featcache(fast_run, split_tree_ro, tmp_path, suffix):
    out = tmp_path / f"model{suffix}"
    res = invoke("export", fast_run, "-o", out, "--json")
    assert res.exit_code == 0, res.stderr
    assert out.exists() and res.json()["format"] == suffix[1:]

    from featcache.pipeline.extraction.images import load_rgb
    from featcache.pipeline.use.model import load_predictor

    pred = load_predictor(fast_run)
    files = sorted((split_tree_ro / "val" / "green").iterdir()) + sorted((split_tree_ro / "val" / "red").iterdir())
    x = np.stack([pred.preprocess.transform()(load_rgb(str(f))).numpy() for f in files])
    np.save(tmp_path / "x.npy", x)
    # a fresh interpreter, outside the repo, that never imports featcache's packages
    p = subprocess.run([sys.executable, "-c", LOADER, str(out), str(tmp_path / "x.npy")], capture_output=True,
                       text=True, cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    loaded = json.loads(p.stdout.strip().splitlines()[-1])
    assert loaded["meta"]["class_names"] == pred.class_names
    assert loaded["meta"]["preprocess"]["crop_size"] == pred.preprocess.crop_size

    res = invoke("predict", fast_run, *files, "--top-k", "3", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    for probs, r in zip(loaded["probs"], res.json()["predictions"]):
        by_class = {t["class"]: t["probability"] for t in r["top"]}
        assert [by_class[c] for c in pred.class_names] == pytest.approx(probs, abs=1e-5)


def test_export_rejects_bad_suffix_and_bad_model(fast_run, tmp_path):
    assert_one_line_error(invoke("export", fast_run, "-o", tmp_path / "m.onnx"), ".pt2")
    assert_one_line_error(invoke("export", tmp_path, "-o", tmp_path / "m.pt2"), "neither")
