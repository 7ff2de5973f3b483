"""Small helpers shared by the command modules."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import typer

from gisp.errors import GispError


def parse_floats(text: str, what: str = "sparsity") -> list[float]:
    """``"0,0.2,0.5"`` -> ``[0.0, 0.2, 0.5]`` with a clear error for bad items."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(float(item))
        except ValueError as e:
            raise GispError(f"--{what} takes comma-separated numbers like 0,0.2,0.5; got '{item}'") from e
    if not out:
        raise GispError(f"--{what} is empty")
    return out


# options from a settings dataclass ------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right below it), whitespace collapsed to one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def config_options(cls: type, *, only: Sequence[str] | None = None, defaults: Mapping[str, Any] | None = None,
                   notes: Mapping[str, str] | None = None) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of the dataclass ``cls`` (all of them, or ``only`` those):
    the field's name (``--calib-samples`` for ``calib_samples``; ``--x/--no-x`` for a bool), type, default
    (or ``defaults[name]``) and docstring as help (with ``notes[name]`` appended)."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    defaults, notes = defaults or {}, notes or {}
    chosen = [f for f in dataclasses.fields(cls) if only is None or f.name in only]
    unknown = (set(only or ()) | set(defaults) | set(notes)) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    params = []
    for f in chosen:
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring to serve as its --help line")
        default = defaults.get(f.name, f.default)
        help_text = docs[f.name] + (f" {notes[f.name]}" if f.name in notes else "")
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                        default=typer.Option(default, help=help_text)))
    return params


def with_config(cls: type, *, param: str = "config", only: Sequence[str] | None = None,
                defaults: Mapping[str, Any] | None = None, notes: Mapping[str, str] | None = None,
                fixed: Mapping[str, Any] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command the options of :func:`config_options` instead of retyping them.

    The decorated function declares its other options as usual plus a keyword-only
    ``param`` (``config``); typer sees the other options followed by one option per
    field, and the function receives ``param=cls(**fixed, **those options)``.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func, eval_str=True)
        own = [p for name, p in sig.parameters.items() if name != param]
        fields = config_options(cls, only=only, defaults=defaults, notes=notes)
        names = [p.name for p in fields]
        clash = {p.name for p in own} & set(names)
        if clash:
            raise TypeError(f"{func.__name__} declares {', '.join(sorted(clash))}, which {cls.__name__} provides")

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return func(**kwargs, **{param: cls(**{**(fixed or {}), **values})})

        params = [*own, *fields]
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
