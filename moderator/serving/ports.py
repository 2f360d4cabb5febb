"""The ports a supervisor (--workers) holds for its workers while it runs."""

from __future__ import annotations

import socket
from typing import Any

from moderator.errors import ConfigError


def hold_port(host: str, port: int) -> list[socket.socket]:
    """Bind every address of `host` on `port` with SO_REUSEPORT and keep them, without
    listening: the workers (same user, same option) can bind them too. A port anything else
    holds (a server, another supervisor) is refused first. Port 0 picks a free one."""
    bind_host = host.strip("[]")  # [::] -> ::
    held: list[socket.socket] = []
    try:
        for family, kind, proto, found in _addresses(bind_host, port):
            # port 0: the first address gets a free port, the others take the same one
            address = (found[0], held[0].getsockname()[1], *found[2:]) if held else found
            if address[1]:
                _refuse_if_taken(family, kind, proto, address)
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in held:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return held


def _addresses(host: str, port: int) -> list[tuple[int, int, int, Any]]:
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    unique: dict[Any, tuple[int, int, int, Any]] = {}
    for family, kind, proto, _, address in found:
        unique.setdefault(address[:2], (family, kind, proto, address))
    return list(unique.values())


def _refuse_if_taken(family: int, kind: int, proto: int, address: Any) -> None:
    """OSError when a socket already holds `address`: a plain bind (SO_REUSEADDR, as servers
    set it, but no SO_REUSEPORT) fails then, and succeeds over connections in TIME_WAIT."""
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
