"""Command-line interface: ``gisp prune``, ``gisp eval``, ``gisp demo`` and friends.

Each command lives in its own module and registers on :data:`gisp.cli.app.app`.
User errors (:class:`gisp.GispError`) print one line and exit with status 2.
"""

import sys

import gisp.cli.compare_cmd  # noqa: F401  (registers gisp compare)
import gisp.cli.export_cmd  # noqa: F401  (registers gisp export)
import gisp.cli.recover_cmd  # noqa: F401  (registers gisp recover)
import gisp.cli.report_cmd  # noqa: F401  (registers gisp report)
from gisp.cli import demo_cmd, eval_cmd, prune_cmd  # noqa: F401  (register commands)
from gisp.cli.app import app
from gisp.errors import GispError


def main() -> None:
    try:
        app()
    except GispError as e:
        print(f"gisp: error: {e}", file=sys.stderr)
        sys.exit(2)
