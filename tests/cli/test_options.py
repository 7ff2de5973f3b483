"""The command line's PruneConfig options are generated from the config's fields and their docstrings."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

import gisp
from gisp.cli import app
from gisp.cli.common import config_options, field_docs, with_config
from gisp.cli.demo_cmd import demo_autocast
from gisp.run import PruneConfig

FIELDS = [f.name for f in dataclasses.fields(PruneConfig)]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_field_is_an_option_with_its_type_default_and_doc():
    docs, hints = field_docs(PruneConfig), typing.get_type_hints(PruneConfig)
    params = config_options(PruneConfig)
    assert [p.name for p in params] == FIELDS
    for p, f in zip(params, dataclasses.fields(PruneConfig), strict=True):
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.annotation is hints[f.name]
        assert p.default.default == f.default
        assert p.default.help == docs[f.name] and len(docs[f.name]) > 10, f.name
        assert "\n" not in p.default.help and "  " not in p.default.help  # one line, single spaces
    assert docs["grad_accum_dtype"].startswith("Precision the calibration-set gradient is summed in")


def _help(command: str) -> str:
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    return r.output


def test_prune_help_lists_every_setting_and_the_explicit_options():
    text = _help("prune")
    for name in FIELDS:
        assert option(name) in text, name
    for name in ("--out", "--dtype", "--device", "--resume", "--device-map"):
        assert name in text
    assert "--no-grad-checkpointing" in text  # bools keep their --x/--no-x pair
    assert "Calibration samples (windows for lm)" in text  # the field's docstring is the help line


def _capture(monkeypatch, module: str) -> dict:
    """Replace the command's run_prune: record the config it gets, then stop the command."""
    seen: dict = {}

    def fake(model, out, config, **kw):
        seen.update(model=model, config=config, **kw)
        raise gisp.GispError("stopped by the test")

    monkeypatch.setattr(f"gisp.cli.{module}.run_prune", fake)
    return seen


def test_prune_builds_the_config_from_its_options(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, "prune_cmd")
    r = CliRunner().invoke(app, ["prune", "m", "--out", str(tmp_path), "--calib-samples", "7", "--steps", "3",
                                 "--grad-checkpointing", "--shrink-every", "2", "--dtype", "fp32"])
    assert isinstance(r.exception, gisp.GispError), r.output
    assert seen["config"] == PruneConfig(calib_samples=7, steps=3, grad_checkpointing=True, shrink_every=2)
    assert seen["model"] == "m" and seen["dtype"] == "fp32" and seen["resume"] is False


def test_demo_takes_three_settings_with_its_own_defaults(monkeypatch):
    text = _help("demo")
    for name in ("--steps", "--calib-samples", "--seq-len", "--out", "--max-windows", "--fresh"):
        assert name in text
    assert "--target" not in text and "--objective" not in text
    seen = _capture(monkeypatch, "demo_cmd")
    CliRunner().invoke(app, ["demo", "--seq-len", "64"])
    assert seen["config"] == PruneConfig(target=0.5, steps=5, calib="c4", calib_samples=16, seq_len=64,
                                         autocast=demo_autocast(), shrink_every=1)


@pytest.mark.parametrize("native", [True, False])
def test_demo_uses_bf16_only_where_the_hardware_has_it(monkeypatch, native):
    monkeypatch.setattr("gisp.run.gradients.native_bf16", lambda device: native)
    seen = _capture(monkeypatch, "demo_cmd")
    CliRunner().invoke(app, ["demo"])
    assert seen["config"].autocast == ("bf16" if native else "none")


@dataclass
class Settings:
    size: int = 1
    """How big."""
    name: str = "x"


def test_generated_options_refuse_undocumented_fields_and_clashes():
    assert field_docs(Settings) == {"size": "How big."}
    with pytest.raises(TypeError, match="Settings.name has no docstring"):
        config_options(Settings)
    assert [p.name for p in config_options(Settings, only=["size"])] == ["size"]
    with pytest.raises(TypeError, match="no field colour"):
        config_options(Settings, defaults={"colour": 1})

    def command(size: int = 0, *, config: Settings) -> None: ...

    with pytest.raises(TypeError, match="declares size"):
        with_config(Settings, only=["size"])(command)
