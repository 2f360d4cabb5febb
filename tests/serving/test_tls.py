from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moderator.errors import ConfigError
from moderator.serving.tls import CertificateReloader, TlsFiles, check_key_pair
from tests.helpers import make_certificates


def test_a_certificate_and_a_key_that_do_not_belong_together_are_refused(
    tmp_path: Path,
) -> None:
    first, second = make_certificates(tmp_path / "a"), make_certificates(tmp_path / "b")
    check_key_pair(first.server_cert, first.server_key, "--tls-cert")
    with pytest.raises(ConfigError, match=r"--tls-cert .* not a usable pair"):
        check_key_pair(first.server_cert, second.server_key, "--tls-cert")


def test_a_rotation_seen_half_done_is_taken_once_it_is_complete(tmp_path: Path) -> None:
    first, second = make_certificates(tmp_path / "a"), make_certificates(tmp_path / "b")
    live = tmp_path / "live"
    live.mkdir()
    for source in (first.server_cert, first.server_key):
        shutil.copy(source, live / source.name)
    reloader = CertificateReloader(TlsFiles(live / "server.pem", live / "server.key"))
    assert reloader.fetch() is None  # nothing changed
    shutil.copy(second.server_cert, live / "server.pem")  # the certificate lands first
    assert reloader.fetch() is None  # a mismatched pair is not served
    shutil.copy(second.server_key, live / "server.key")
    assert reloader.fetch() is not None  # now the new pair
    assert reloader.fetch() is None
