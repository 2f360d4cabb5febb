"""`moderator serve`: run the gRPC service."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping

from moderator.cli.flags import Subparsers
from moderator.cli.options import (
    MODEL_OPTIONS,
    SERVE_OPTIONS,
    add_options,
    config_from_args,
)


def add_parser(commands: Subparsers, env: Mapping[str, str]) -> None:
    serve = commands.add_parser("serve", help="run the gRPC service")
    add_options(serve, (*MODEL_OPTIONS, *SERVE_OPTIONS), env)
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # a bad flag is named before torch is even imported
    from moderator.serving.server import serve

    asyncio.run(serve(config))
    return 0
