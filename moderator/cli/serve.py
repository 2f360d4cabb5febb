"""`moderator serve`: run the gRPC service."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping

from moderator.cli.flags import CLIENT_VARIABLES, ENV_PREFIX, SERVICE_LINK_NAME, Subparsers
from moderator.cli.options import (
    MODEL_OPTIONS,
    SERVE_OPTIONS,
    add_options,
    config_from_args,
    serve_variables,
)

log = logging.getLogger(__name__)


def add_parser(commands: Subparsers, env: Mapping[str, str]) -> None:
    serve = commands.add_parser("serve", help="run the gRPC service")
    add_options(serve, (*MODEL_OPTIONS, *SERVE_OPTIONS), env)
    serve.set_defaults(handler=run, unknown_variables=unknown_variables(env))


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """MODERATOR_* variables that set nothing: a misspelt setting is otherwise silently lost.
    (Kubernetes service links of a Service named moderator... are not settings, nor typos.)"""
    known = serve_variables() | CLIENT_VARIABLES
    return sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX)
        and name not in known
        and not SERVICE_LINK_NAME.fullmatch(name)
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # a bad flag is named before torch is even imported
    for name in args.unknown_variables:
        log.warning("%s is not a setting of moderator serve: ignored (misspelt?)", name)
    if config.server.workers > 1:
        from moderator.serving.workers import LogSettings, Supervisor

        logs = LogSettings(args.log_level, args.log_format, args.log_requests)
        return asyncio.run(Supervisor(config, logs).run())
    from moderator.serving.server import serve

    asyncio.run(serve(config))
    return 0
