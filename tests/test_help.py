"""Help that teaches (issue 21): every option documented with its default, grouped, each command with examples."""

from __future__ import annotations

import pytest
import typer
from typer.core import TyperOption

from segcli.cli import app
from tests.conftest import run_cli

COMMAND = typer.main.get_command(app)
COMMANDS = sorted(COMMAND.commands)  # type: ignore[attr-defined]


def _options(name: str) -> list[TyperOption]:
    return [p for p in COMMAND.commands[name].params if isinstance(p, TyperOption)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_documented_with_its_default(name):
    missing = []
    for opt in _options(name):
        flag = opt.opts[0]
        if not (opt.help or "").strip():
            missing.append(f"{flag}: no help")
            continue
        takes_value = not opt.is_flag and not opt.count
        default_shown = opt.show_default not in (False, None) and opt.default is not None
        said = "default" in opt.help.lower()
        if takes_value and opt.default is None and not said:
            missing.append(f"{flag}: no default given (say 'Default: ...' in its help)")
        elif takes_value and opt.default is not None and not (default_shown or said or opt.show_default is None):
            missing.append(f"{flag}: default {opt.default!r} not shown")
    assert not missing, f"segcli {name}: " + "; ".join(missing)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_ends_with_examples(name):
    epilog = COMMAND.commands[name].epilog or ""  # type: ignore[attr-defined]
    examples = [line for line in epilog.splitlines() if line.strip().startswith("segcli ")
                or "| segcli " in line or "'segcli " in line]
    assert epilog.startswith("Examples:") and 2 <= len(examples) <= 5, (name, epilog)


def test_predict_options_are_grouped_in_panels():
    panels = {getattr(o, "rich_help_panel", None) for o in _options("predict")} - {None}
    assert {"Input and output", "Model and method", "Method parameters", "Performance", "Memory and big images",
            "Batch and cluster", "Reporting"} <= panels
    ungrouped = [o.opts[0] for o in _options("predict") if getattr(o, "rich_help_panel", None) is None
                 and o.opts[0] not in ("--help",)]
    assert not ungrouped, ungrouped


def test_help_snapshot_shows_ranges_and_no_type_noise_on_flags():
    r = run_cli("predict", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0
    text = r.stdout
    for piece in ("[0–1]", "[1–1024]", "[0–0.95]", "Default: the bundle's, else 0.5", "Examples:",
                  "--output-type", "dicom-seg", "SLURM"):
        assert piece in text, piece
    flag_lines = [line for line in text.splitlines() if "--probabilities" in line or "--skip-existing" in line]
    assert flag_lines and not any("<bool>" in line for line in flag_lines)


def test_json_means_stdout_everywhere():
    """--json is a flag printing JSON on stdout for every command that has it; files are --json-file."""
    for name in COMMANDS:
        for opt in _options(name):
            if "--json" in opt.opts:
                assert opt.is_flag, f"segcli {name} --json takes a value"


def test_no_type_noise_on_any_line_of_any_help():
    """Issue 31: every line of every command's help, not a few chosen ones: no ``<bool>`` (flags, --help),
    no ``<list[...]>`` (variadic arguments, repeatable options), whatever the typer version installed."""
    from typer.testing import CliRunner

    runner = CliRunner()
    bad = []
    for name in [None, *COMMANDS]:
        args = ["--help"] if name is None else [name, "--help"]
        r = runner.invoke(app, args, env={"COLUMNS": "220", "NO_COLOR": "1", "TERM": "dumb"})
        assert r.exit_code == 0, (name, r.output)
        lines = r.output.splitlines()
        assert len(lines) > 5, name
        bad += [f"{name}: {ln.strip()}" for ln in lines if "<bool>" in ln or "<list[" in ln]
    assert not bad, "\n".join(bad)
