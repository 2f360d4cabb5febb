"""`moderator health`: exit 0 when the server says SERVING (container health checks, probes)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moderator_client.client import credentials

from moderator.cli.check import tls_files
from moderator.cli.flags import Subparsers, env_name
from moderator.errors import ConfigError

SERVICE = "moderator.v1.Moderator"


def add_parser(commands: Subparsers, env: Mapping[str, str]) -> None:
    health = commands.add_parser("health", help="exit 0 if the server is SERVING, else 1")
    health.add_argument("--server", default=env.get(env_name("--server"), "localhost:50051"))
    health.add_argument(
        "--service",
        default=SERVICE,
        help=f"health service to ask: {SERVICE}, '' or liveness (the model worker is not stuck)",
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds")
    health.add_argument("--tls-ca", type=Path, help="verify the server against this PEM CA (TLS)")
    health.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    health.add_argument("--tls-key", type=Path, help="client key (mutual TLS)")
    health.set_defaults(handler=run)


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """TLS when any --tls-* flag is given (the client package's rules), else plaintext."""
    try:
        tls = credentials(*tls_files(args))
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from exc
    if tls is None:
        return grpc.insecure_channel(args.server)
    return grpc.secure_channel(args.server, tls)


def run(args: argparse.Namespace) -> int:
    with open_channel(args) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        try:
            request = health_pb2.HealthCheckRequest(service=args.service)
            status = check(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    print(f"{args.server}: {name}")
    return 0 if status.status == health_pb2.HealthCheckResponse.SERVING else 1
