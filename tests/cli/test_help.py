"""Every subcommand has help text and is documented in the README."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.main import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str | None]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append(((*prefix, name), helps.get(name)))
                out.extend(_walk(sub, (*prefix, name)))
    return out


def test_every_subcommand_has_help() -> None:
    commands = _walk(build_parser())
    assert len(commands) > 20
    missing = [" ".join(c) for c, h in commands if not h]
    assert not missing


def test_every_top_level_command_is_in_the_readme() -> None:
    text = README.read_text()
    tops = {c[0] for c, _ in _walk(build_parser())}
    missing = [t for t in sorted(tops) if f"tailledger {t}" not in text]
    assert not missing, f"README does not mention: {missing}"
