"""Options: one set of defaults, refusals instead of silently dropped options, names as the caller spelt them."""
from __future__ import annotations

import numpy as np
import pytest
from synthcache import run_cli, write_cache

import featcache
from featcache.pipeline.config import HeadConfig
from featcache.pipeline.errors import FeatcacheError, FeatcacheWarning


def _xy(n=90, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    return (rng.normal(size=(n, d)) + 2.5 * np.eye(3, d)[y]).astype(np.float32), y


def test_the_linear_default_is_the_exact_probe_in_the_dataclass_too():
    assert HeadConfig.solver == "auto" and HeadConfig.C is None  # as the CLI and fit_heads default them
    s = featcache.fit_heads(_xy())
    assert len(s.leaderboard) == 10 and all(r["solver"] == "exact" for r in s.leaderboard)


def test_an_epoch_option_switches_the_solver_and_says_so():
    with pytest.warns(FeatcacheWarning, match="training by epochs because weight_decay, epochs were given"):
        s = featcache.fit_heads(_xy(), weight_decay=1e-3, epochs=3)
    assert "solver" not in s.leaderboard[0] and s.leaderboard[0]["weight_decay"] == 1e-3


@pytest.mark.parametrize(("kw", "words"), [
    (dict(C=[0.1, 1.0], lr=1e-2), r"^C with lr: the exact probe takes C"),
    (dict(solver="exact", lr=1e-3), r"^lr configure epoch training, which solver exact does not do"),
    (dict(solver="epochs", C=1.0), r"^C with solver epochs"),
])
def test_an_option_the_solver_would_not_read_is_refused_not_dropped(kw, words):
    with pytest.raises(FeatcacheError, match=words):
        featcache.fit_heads(_xy(), **kw)


def test_python_callers_see_parameter_names_and_the_cli_sees_flags(tmp_path):
    with pytest.raises(FeatcacheError, match=r"invalid value: weight_decay -1\.0"):
        featcache.fit_heads(_xy(), weight_decay=-1.0, solver="epochs")
    cache = write_cache(tmp_path / "c.h5", {"train": 10, "val": 4, "test": 4})
    code, out, err = run_cli("fit-head", cache, "-o", tmp_path / "r", "--weight-decay", "-1")
    assert code != 0 and "invalid value: --weight-decay -1.0" in err


def test_the_cli_says_when_an_epoch_option_switches_the_solver(tmp_path):
    cache = write_cache(tmp_path / "c.h5", {"train": 10, "val": 4, "test": 4})
    code, out, err = run_cli("fit-head", cache, "-o", tmp_path / "r", "--weight-decay", "1e-3", "--epochs", "2",
                             "--no-plots")
    assert code == 0, err
    assert "featcache: warning: linear head: training by epochs because --weight-decay, --epochs were given" in err


def _parsed_default(param, ctx, field_type: str):
    """A click option's default as the config field holds it (comma lists -> tuples)."""
    from featcache.pipeline.heads.report import parse_hidden
    from featcache.pipeline.options import float_list, int_list, str_list

    d = param.get_default(ctx)  # flags: False, as click parses them
    if param.name == "hidden":
        return parse_hidden(tuple(d))
    if isinstance(d, str) and field_type.startswith("tuple[float"):
        return float_list(d, param.name)
    if isinstance(d, str) and field_type.startswith("tuple[int"):
        return int_list(d, param.name)
    if isinstance(d, str) and field_type.startswith("tuple[str"):
        return str_list(d, param.name)
    if isinstance(d, (list, tuple)) and field_type.startswith("tuple"):
        return tuple(d)
    return d


# fields set from the command line in another form: arguments, -o, or parsed from a list option
NOT_OPTIONS = {"image_dir", "output", "cache", "layers", "train_sizes", "class_weight"}


@pytest.mark.parametrize(("command", "config"), [("extract", "ExtractConfig"), ("fit-head", "HeadConfig")])
def test_every_cli_default_is_the_config_default(command, config):
    """Each default is declared once, in the config dataclass; the CLI's options agree with it, and
    every config field is reachable from the command line."""
    import dataclasses
    import typing

    import click

    from featcache import cli
    from featcache.pipeline import config as config_mod

    cls = getattr(config_mod, config)
    hints = typing.get_type_hints(cls)
    cmd = cli.main.commands[command]
    ctx = click.Context(cmd)
    params = {p.name: p for p in cmd.params}
    diffs, missing = [], []
    for f in dataclasses.fields(cls):
        if f.name in NOT_OPTIONS:
            continue
        if f.name not in params:
            missing.append(f.name)
            continue
        got = _parsed_default(params[f.name], ctx, str(hints[f.name]).replace("typing.", ""))
        if got != f.default:
            diffs.append((f.name, got, f.default))
    assert not missing, f"config fields without a {command} option: {missing}"
    assert not diffs, f"{command} defaults that differ from {config}: {diffs}"
