"""The typer application that every command module registers on."""

import typer

app = typer.Typer(
    name="gisp",
    help="Global Iterative Structured Pruning for Llama-family LLMs: prune once, deploy many.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
