"""Flags and their MODERATOR_* environment variables: naming, value kinds, and the check that
a variable's value was meant for this program."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

# what `ArgumentParser.add_subparsers` returns: each command module adds its parser to it
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

ENV_PREFIX = "MODERATOR_"
TRUE_WORDS = ("1", "true", "yes", "on")
# read by the client commands (check, health), not by serve
CLIENT_VARIABLES = frozenset({"MODERATOR_SERVER", "MODERATOR_TOKEN", "MODERATOR_TOKEN_FILE"})
# Kubernetes gives every pod {SERVICE}_PORT=tcp://10.0.0.1:50051 and friends for each Service
# in its namespace (service links): a Service named "moderator" sets MODERATOR_PORT.
SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://[^\s]+")
# ... and the rest of each Service's set: {SVC}_SERVICE_HOST, {SVC}_SERVICE_PORT[_{NAME}],
# {SVC}_PORT_{N}_{PROTO}[_PROTO|_PORT|_ADDR].
SERVICE_LINK_NAME = re.compile(
    r"\w+_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)"
)


def env_name(flag: str) -> str:
    """--max-wait-ms -> MODERATOR_MAX_WAIT_MS"""
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def on_off(value: str) -> bool:
    """An on/off flag value (also true/false, yes/no, 1/0)."""
    word = value.strip().lower()
    if word in ("on", *TRUE_WORDS):
        return True
    if word in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r}: use on or off")


def auto_on_off(value: str) -> bool | None:
    """auto (None: the service decides), or an on/off flag value."""
    if value.strip().lower() == "auto":
        return None
    try:
        return on_off(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{value!r}: use auto, on or off") from None


def one_of(*allowed: str) -> Callable[[str], str]:
    """A value kind accepting `allowed` in any case (returned as written in `allowed`)."""
    by_lower = {word.lower(): word for word in allowed}

    def kind(value: str) -> str:
        try:
            return by_lower[value.strip().lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(
                f"{value!r}: use one of {', '.join(allowed)}"
            ) from None

    kind.__name__ = "choice"  # argparse names the kind in its error message
    return kind


@dataclass(frozen=True)
class Option:
    flag: str
    kind: Callable[[str], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return env_name(self.flag)


def kind_with_env(option: Option, env: Mapping[str, str]) -> Callable[[str], Any]:
    """`option.kind`, except that the value of its variable is refused, with the cause, when
    it is a Kubernetes service link rather than a setting."""
    value = env.get(option.env, "")
    if not SERVICE_LINK.fullmatch(value.strip()):
        return option.kind
    # MODERATOR_PORT comes from a Service named moderator, MODERATOR_ADMIN_PORT from moderator-admin
    service = option.env.removesuffix("_PORT").lower().replace("_", "-")

    def refuse_service_link(given: str) -> Any:
        if given != value:  # the same flag given on the command line
            return option.kind(given)
        raise argparse.ArgumentTypeError(
            f"{option.env}={value} is a Kubernetes service link (from a Service named "
            f"{service}), not a setting: set enableServiceLinks: false in the pod spec"
        )

    return refuse_service_link
