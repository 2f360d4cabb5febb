"""`moderator check`: moderate image files with a running server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc

from moderator.cli.flags import Subparsers, env_name
from moderator.config import MIB
from moderator.errors import ConfigError
from moderator.v1 import moderator_pb2 as pb
from moderator.v1 import moderator_pb2_grpc as pb_grpc

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
    options = [
        ("grpc.max_send_message_length", 256 * MIB),
        ("grpc.max_receive_message_length", 256 * MIB),
    ]
    with open_channel(args, options) as channel:
        stub = pb_grpc.ModeratorStub(channel)
        metadata = bearer(args)
        for start in range(0, len(args.files), CHECK_BATCH_SIZE):
            files: list[Path] = args.files[start : start + CHECK_BATCH_SIZE]
            request = pb.ModerateRequest(
                images=[pb.Image(id=str(path), data=path.read_bytes()) for path in files],
                policy_ids=args.policy,
                include_embeddings=args.embeddings,
            )
            try:
                response = stub.Moderate(request, timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
            for result in response.results:
                if args.json or args.embeddings:
                    from moderator.wire import format_json  # loads torch: only when asked

                    context = (response.policy_version, response.model, response.precision)
                    print(format_json(result, *context))
                else:
                    print(format_line(result))
    return 0


def open_channel(args: argparse.Namespace, options: list[tuple[str, int]]) -> grpc.Channel:
    """TLS when any --tls-* flag is given, else plaintext."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return grpc.insecure_channel(args.server, options=options)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together (a client certificate)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
        private_key=args.tls_key.read_bytes() if args.tls_key else None,
        certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
    )
    return grpc.secure_channel(args.server, credentials, options=options)


def bearer(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The authorization metadata: --token-file, else MODERATOR_TOKEN, else none."""
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else args.token
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {args.token_file}: cannot read it ({exc})") from exc
    if token and not token.isascii():
        raise ConfigError("the token is not ASCII: was the wrong file given?")
    return (("authorization", f"Bearer {token}"),) if token else ()


def format_line(result: pb.ImageResult) -> str:
    """One ImageResult as a tab-separated line: id, decision, violations (or the error)."""
    decision = pb.Decision.Name(result.decision).removeprefix("DECISION_")
    if result.decision == pb.DECISION_ERROR:
        code = pb.ImageErrorCode.Name(result.error.code).removeprefix("IMAGE_ERROR_CODE_")
        return f"{result.id}\t{decision}\t{code}: {result.error.message}"
    violations = [
        f"{p.policy_id}{'(shadow)' if p.mode == pb.POLICY_MODE_SHADOW else ''}="
        f"{p.score:.3f}>={p.threshold:.3f} ({p.matched_description})"
        for p in result.policies
        if p.violated
    ]
    return f"{result.id}\t{decision}\t{', '.join(violations) or '-'}"
