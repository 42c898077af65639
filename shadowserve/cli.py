"""The ``shadowserve`` command.

Each subcommand lives in ``shadowserve/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up, so ``shadowserve --help`` stays fast.
User errors print ``error: <message>`` and exit 2; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from shadowserve.errors import ShadowServeError

# name -> (module, one-line help). Modules are imported when the parser is built; they must
# keep heavy imports (torch, transformers) inside their run() functions.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("shadowserve.commands.demo", "run the main job end to end on the default store"),
    "generate": ("shadowserve.commands.generate", "generate text from a prompt"),
    "models": ("shadowserve.commands.models", "list or download models"),
    "store": ("shadowserve.commands.store", "run or inspect a KV chunk store"),
    "serve": ("shadowserve.commands.serve", "run the OpenAI-compatible HTTP server"),
    "config": ("shadowserve.commands.config", "show the effective configuration"),
    "bench": ("shadowserve.commands.bench", "benchmarks (engine, codec, store, ...)"),
}


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Every ``shadowserve.*`` logger (control plane, data plane, store, server) writes to stderr."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after an option's help, unless the help already says or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shadowserve",
        description="ShadowServe: LLM serving with distributed prefix caching, its KV fetching kept off the "
                    "model's cores. Run 'shadowserve COMMAND --help' for a command's options.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="log level of every command (default warning; serve: its own --log-level, default info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a command whose module is not written yet
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level or "warning")
    try:
        return int(args._run(args) or 0)
    except ShadowServeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
