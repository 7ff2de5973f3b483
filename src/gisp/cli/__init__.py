"""Command-line interface: ``gisp prune``, ``gisp eval``, ``gisp demo`` and friends.

Each command lives in its own module and registers on :data:`gisp.cli.app.app`.
User errors (:class:`gisp.GispError`) and usage errors (a bad option value, a
missing argument) print one line and exit with status 2.
"""

import sys

import typer

import gisp.cli.compare_cmd  # noqa: F401  (registers gisp compare)
import gisp.cli.export_cmd  # noqa: F401  (registers gisp export)
import gisp.cli.recover_cmd  # noqa: F401  (registers gisp recover)
import gisp.cli.report_cmd  # noqa: F401  (registers gisp report)
from gisp.cli import demo_cmd, eval_cmd, prune_cmd  # noqa: F401  (register commands)
from gisp.cli.app import app
from gisp.errors import GispError


def usage_line(e: typer.TyperException) -> str:
    """A usage error (bad value, unknown option, missing argument) as one line that says where help is."""
    line = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    return f"{line} (see '{ctx.command_path} --help')" if ctx is not None else line


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except GispError as e:
        print(f"gisp: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except typer.TyperException as e:  # typer's click: usage errors; `gisp` alone printed its help
        if type(e).__name__ == "NoArgsIsHelpError":
            sys.exit(0)
        print(f"gisp: error: {usage_line(e)}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("gisp: aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
