"""The local cluster's own CA: what `hakeeper demo` runs etcd with."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hakeeper.localcluster.certs import TlsFiles, ensure_certificates
from hakeeper.localcluster.etcd import EtcdSecurity, etcd_argv


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificates_keys_private_ca_key_never_written(tmp_path: Path) -> None:
    files = TlsFiles(tmp_path / "tls")
    assert ensure_certificates(files) is True
    assert sorted(p.name for p in files.directory.iterdir()) == sorted(p.name for p in files.all())
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    for key in (files.server_key, files.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca, server, client = _cert(files.ca_cert), _cert(files.server_cert), _cert(files.client_cert)
    for leaf in (server, client):
        leaf.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    server_eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in server_eku and ExtendedKeyUsageOID.CLIENT_AUTH in server_eku
    # etcd answers 400 to a gateway request whose client certificate has a CN.
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    client_eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(client_eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_valid_certificates_are_reused_and_broken_ones_replaced(tmp_path: Path) -> None:
    files = TlsFiles(tmp_path / "tls")
    ensure_certificates(files)
    before = files.ca_cert.read_bytes()
    assert ensure_certificates(files) is False
    assert files.ca_cert.read_bytes() == before
    files.client_key.unlink()
    assert ensure_certificates(files) is True
    assert files.ca_cert.read_bytes() != before  # a new CA: the old server cert is not trusted by it
    _cert(files.server_cert).verify_directly_issued_by(_cert(files.ca_cert))


def test_etcd_argv_with_security_requires_client_certificates(tmp_path: Path) -> None:
    sec = EtcdSecurity(TlsFiles(tmp_path), "/hakeeper/demo", "pw-hk", "pw-root")
    argv = etcd_argv("e1", tmp_path, "https://127.0.0.1:1", "http://127.0.0.1:2", "e1=x", "t", sec)
    for flag in ("--cert-file", "--key-file", "--client-cert-auth", "--trusted-ca-file"):
        assert flag in argv
    assert argv[argv.index("--trusted-ca-file") + 1] == str(tmp_path / "ca.crt")
    # A cheap password hash: the CLI logs in on every call (the passwords are 192 random bits).
    assert argv[argv.index("--bcrypt-cost") + 1] == "4"
    assert "pw-hk" not in repr(sec) and "pw-root" not in repr(sec)
    plain = etcd_argv("e1", tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2", "e1=x", "t")
    assert "--client-cert-auth" not in plain
