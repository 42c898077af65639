"""``shadowserve config show``: the effective settings after YAML, environment and flags are merged.

Only the subcommand: the merging is ``shadowserve/settings.py``, the dataclasses ``shadowserve/config.py``.
"""

from __future__ import annotations

import argparse

from shadowserve.commands.serve import add_settings_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the effective config as YAML (flags > env > file > defaults)")
    add_settings_arguments(show)


def run(args: argparse.Namespace) -> int:
    from shadowserve.commands.serve import settings_from_args
    from shadowserve.settings import to_yaml

    print(to_yaml(settings_from_args(args)).rstrip("\n"))
    return 0
