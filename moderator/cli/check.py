"""`moderator check`: moderate image files with a running server, through the client package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
from moderator_client import ImageResult, ModeratorClient, PolicyResult

from moderator.cli.flags import Subparsers, env_name
from moderator.errors import ConfigError

CHECK_BATCH_SIZE = 16


def add_parser(commands: Subparsers, env: Mapping[str, str]) -> None:
    check = commands.add_parser("check", help="moderate image files with a running server")
    check.add_argument("files", nargs="+", type=Path)
    check.add_argument("--server", default=env.get(env_name("--server"), "localhost:50051"))
    check.add_argument("--json", action="store_true", help="print one JSON object per image")
    check.add_argument(
        "--embeddings",
        action="store_true",
        help="include image embeddings (implies --json): the file `moderator rescore` reads",
    )
    check.add_argument(
        "--policy", action="append", default=[], help="only this policy id (repeatable)"
    )
    check.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    check.add_argument(
        "--token-file",
        type=Path,
        default=env.get(env_name("--token-file")),
        help="file holding the bearer token (or the token itself in MODERATOR_TOKEN)",
    )
    check.set_defaults(token=env.get("MODERATOR_TOKEN"))
    check.add_argument("--tls-ca", type=Path, help="verify the server against this PEM CA (TLS)")
    check.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    check.add_argument("--tls-key", type=Path, help="client key (mutual TLS)")
    check.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        for start in range(0, len(args.files), CHECK_BATCH_SIZE):
            files: list[Path] = args.files[start : start + CHECK_BATCH_SIZE]
            try:
                answer = client.moderate(files, args.policy, include_embeddings=args.embeddings)
            except grpc.RpcError as exc:
                print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            if args.json or args.embeddings:
                print("\n".join(answer.json_lines()))
            else:
                print("\n".join(format_line(result) for result in answer.results))
    return 0


def open_client(args: argparse.Namespace) -> ModeratorClient:
    """TLS when any --tls-* flag is given, else plaintext; the token if there is one."""
    ca, cert, key = tls_files(args)
    try:
        return ModeratorClient(
            args.server,
            tls_ca=ca,
            tls_cert=cert,
            tls_key=key,
            token=read_token(args),
            timeout=args.timeout,
        )
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from exc


def tls_files(args: argparse.Namespace) -> tuple[Path | None, Path | None, Path | None]:
    """--tls-ca, --tls-cert and --tls-key, the last two together or not at all."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together (a client certificate)")
    return args.tls_ca, args.tls_cert, args.tls_key


def read_token(args: argparse.Namespace) -> str | None:
    """--token-file, else MODERATOR_TOKEN, else none."""
    if not args.token_file:
        return args.token  # type: ignore[no-any-return]
    try:
        return Path(args.token_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {args.token_file}: cannot read it ({exc})") from exc


def format_line(result: ImageResult) -> str:
    """One result as a tab-separated line: id, decision, violations (or the error)."""
    decision = result.decision.upper()
    if result.error is not None:
        return f"{result.id}\t{decision}\t{result.error.code.upper()}: {result.error.message}"
    violations = [
        f"{p.policy_id}{'(shadow)' if p.mode == 'shadow' else ''}={why(p)}"
        for p in result.violations
    ]
    allowed = [f"{p.policy_id}: allowed by {p.allowed_by}" for p in result.policies if p.allowed_by]
    return f"{result.id}\t{decision}\t{', '.join(violations + allowed) or '-'}"


def why(policy: PolicyResult) -> str:
    """What made a violated policy violated: a hash, an example or its descriptions."""
    if policy.matched_hash:
        return f"hash {policy.matched_hash}"
    if policy.matched_example and (
        not policy.matched_description or policy.score < policy.threshold
    ):
        return (
            f"{policy.example_score:.3f}>={policy.example_threshold:.3f} ({policy.matched_example})"
        )
    return f"{policy.score:.3f}>={policy.threshold:.3f} ({policy.matched_description})"
