"""CLI plumbing kept out of cli.py: one-line errors, summaries, list-valued options."""
from __future__ import annotations

import json
import os
import sys

import click

from pipeline.errors import FeatcacheError


def fail(message: str, code: int = 1) -> None:
    """Print one line on stderr and exit non-zero."""
    first = " ".join(str(message).split()) or "error"
    click.echo(f"featcache: error: {first}", err=True)
    sys.exit(code)


class Group(click.Group):
    """A click group whose every error is one line on stderr (no usage dump, no traceback).

    Set FEATCACHE_DEBUG=1 to see the traceback of an unexpected error.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name or "featcache", complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except FeatcacheError as e:
            fail(str(e))
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted", 130)
        except Exception as e:  # a bug, not bad input: still one line unless debugging
            if os.environ.get("FEATCACHE_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {e} (set FEATCACHE_DEBUG=1 for the traceback)")
        sys.exit(rv if isinstance(rv, int) else 0)


def emit(summary: dict, as_json: bool, lines: list[str]) -> None:
    """``--json``: one JSON object on stdout and nothing else; otherwise human lines."""
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        for line in lines:
            click.echo(line)


def progress_enabled(as_json: bool) -> bool:
    """Progress bars go to stderr, and only when it is a terminal: a log or a pipe gets the
    summary and, on failure, exactly one error line (``as_json`` changes nothing here)."""
    return sys.stderr.isatty()


def float_list(value: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(value).split(",") if v.strip() != "")
    except ValueError:
        raise click.BadParameter(f"expected a number or comma list, got {value!r}", param_hint=name) from None


def int_list(value: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip() != "")
    except ValueError:
        raise click.BadParameter(f"expected an integer or comma list, got {value!r}", param_hint=name) from None
