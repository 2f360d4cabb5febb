"""`moderator token`: a new random bearer token and the token-file entry for it."""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Mapping

from moderator.cli.flags import Subparsers

TOKEN_BYTES = 32  # 256 bits
ROLES = ("moderate", "rescore", "admin")


def add_parser(commands: Subparsers, env: Mapping[str, str]) -> None:
    token = commands.add_parser(
        "token", help="print a new bearer token and its --auth-tokens entry (SHA-256 only)"
    )
    token.add_argument(
        "--name", type=caller_name, default="my-caller", help="caller name (metrics and logs)"
    )
    token.add_argument(
        "--role", action="append", choices=ROLES, help="a role (repeatable; default moderate)"
    )
    token.set_defaults(handler=run)


def caller_name(value: str) -> str:
    from moderator.serving.access import CALLER_NAME, RESERVED_NAMES  # only for this command

    if not CALLER_NAME.match(value) or value in RESERVED_NAMES:
        raise argparse.ArgumentTypeError(
            f"{value!r}: 1-64 letters, digits, '_', '.' or '-', not anonymous/unauthenticated"
        )
    return value


def run(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(TOKEN_BYTES)
    from moderator.serving.access import token_digest  # only for this command

    digest = token_digest(token)
    roles = ", ".join(args.role or ["moderate"])
    print(f"token (give it to the caller; it is not stored anywhere): {token}")
    print("entry for the --auth-tokens file, under 'tokens:':")
    print(f'  - name: "{args.name}"\n    sha256: "{digest}"\n    roles: [{roles}]')
    return 0
