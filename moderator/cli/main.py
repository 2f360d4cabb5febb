"""Command line: argv + MODERATOR_* environment -> Config -> run. The only place that reads env.

moderator serve [--demo] [--policies DIR] [--model NAME] [--pretrained TAG|PATH|none] ...
moderator check [--server HOST:PORT] [--json] [--embeddings] FILE...
moderator policies validate DIR
moderator policies test POLICY_DIR EXAMPLES_DIR
moderator calibrate POLICY_DIR LABELS [--target-precision P | --target-recall R] [--report F]
moderator rescore EMBEDDINGS --policies DIR [--baseline DIR] [--out FILE]
moderator token [--name NAME] [--role ROLE]...
moderator health [--server HOST:PORT] [--tls-ca CA]

Each command is a module of this package with `add_parser` and its handlers; heavy imports
(torch, the offline tools, the server) happen only in the handler that needs them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from moderator.cli import calibrate, check, health, policies, rescore, serve, token
from moderator.errors import ModeratorError, PolicyError
from moderator.logs import configure_logging

COMMANDS = (serve, check, health, policies, calibrate, rescore, token)


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moderator", description="Image moderation with CLIP.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands, env)
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser(os.environ if env is None else env).parse_args(argv)
    configure_logging(
        getattr(args, "log_level", "INFO"),
        getattr(args, "log_format", "text"),
        getattr(args, "log_requests", False),
    )
    try:
        code: int = args.handler(args)
    except PolicyError as exc:
        fail(args, "invalid policies", exc.problems)
        return 2
    except ModeratorError as exc:
        fail(args, str(exc), [])
        return 2
    return code


def fail(args: argparse.Namespace, message: str, problems: list[str]) -> None:
    """The error that stops a command: one JSON line with --log-format json (a log pipeline
    keeps the line that explains a crash loop), readable lines otherwise."""
    if getattr(args, "log_format", "text") == "json":
        fields = {"problems": problems} if problems else {}
        logging.getLogger("moderator").error("error: %s", message, extra={"fields": fields})
        return
    if problems:
        print(f"error: {message}:\n  " + "\n  ".join(problems), file=sys.stderr)
    else:
        print(f"error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
