"""TLS and mutual TLS for the gRPC port, with certificates re-read when their files change.

cert-manager and Kubernetes secret mounts replace the files (a `..data` symlink swap) while
the server runs. gRPC asks for the certificate configuration at every new handshake; the
answer is "unchanged" until a file's identity (inode, size, mtime) changes, then the new
files. Connections already open keep the certificate they were made with; nothing is dropped.
A new set that cannot be read keeps the previous one (logged).
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from moderator.errors import ConfigError

log = logging.getLogger(__name__)
MAX_PEM_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


class CertificateReloader:
    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._seen = self._identity()
        self.initial = self._configuration()  # unreadable files stop the start

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: None while nothing changed, else the new configuration."""
        try:
            identity = self._identity()
            if identity == self._seen:
                return None
            configuration = self._configuration()
        except (OSError, ConfigError) as exc:
            log.error("TLS files changed but cannot be read; the previous ones stay: %s", exc)
            return None
        self._seen = identity
        log.info("TLS certificate files changed: serving the new ones to new connections")
        return configuration

    def _identity(self) -> tuple[tuple[int, int, int], ...]:
        identities = []
        for path in self.files.paths():
            status = os.stat(path)
            identities.append((status.st_ino, status.st_size, status.st_mtime_ns))
        return tuple(identities)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        # A certificate replaced before its key (or the other way) is refused here, and the
        # next handshake tries again: the identity seen is only updated on success.
        check_key_pair(self.files.cert, self.files.key, "--tls-cert")
        key, cert = _read_pem(self.files.key), _read_pem(self.files.cert)
        client_ca = _read_pem(self.files.client_ca) if self.files.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], client_ca)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    reloader = CertificateReloader(files)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial,
        reloader.fetch,  # type: ignore[arg-type]  # gRPC takes None as "unchanged"
        require_client_authentication=files.client_ca is not None,
    )


def check_key_pair(cert: Path, key: Path, flag: str) -> None:
    """ConfigError unless `cert` and `key` are PEM files of one certificate and its key."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{flag} {cert} with key {key}: not a usable pair ({exc})") from exc


def _read_pem(path: Path) -> bytes:
    try:
        data = path.read_bytes()[: MAX_PEM_BYTES + 1]
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_PEM_BYTES or b"-----BEGIN " not in data:
        raise ConfigError(f"{path} is not a PEM file")
    return data
