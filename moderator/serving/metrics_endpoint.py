"""The /metrics HTTP(S) endpoint, for the service or for a supervisor (--workers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from moderator.config import ServerConfig
from moderator.errors import ConfigError
from moderator.serving.tls import check_key_pair


def start_metrics_endpoint(registry: CollectorRegistry, config: ServerConfig) -> Any | None:
    """The /metrics HTTP(S) endpoint on --metrics-host/--metrics-port; None when it is off.
    Its server_port is the port it got; shutdown() and server_close() stop it."""
    if config.metrics_port < 0:
        return None
    if config.metrics_tls_cert is not None and config.metrics_tls_key is not None:
        check_key_pair(config.metrics_tls_cert, config.metrics_tls_key, "--metrics-tls-cert")
    host = (config.metrics_host or config.host).strip("[]")  # [::] -> ::
    try:
        httpd, _thread = start_http_server(
            config.metrics_port,
            addr=host,
            registry=registry,
            certfile=_optional(config.metrics_tls_cert),
            keyfile=_optional(config.metrics_tls_key),
            client_cafile=_optional(config.metrics_tls_client_ca),
            client_auth_required=config.metrics_tls_client_ca is not None,
        )
    except OSError as exc:
        where = f"{host}:{config.metrics_port}"
        raise ConfigError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from exc
    return httpd


def _optional(path: Path | None) -> str | None:
    return str(path) if path is not None else None
