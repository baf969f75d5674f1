"""The local cluster's own certificate authority: a CA, a server certificate for 127.0.0.1 /
localhost and a client certificate, written as PEM files (keys mode 0600).

The CA's private key is never written: it signs the two certificates and is dropped, so nobody
who later reads the directory can mint another certificate etcd would accept.  Files that are
already there and still valid for a while are reused (a restarted demo keeps its certificates);
otherwise all of them are made again."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hakeeper.localcluster.layout import HOST

VALID_DAYS = 825  # the longest validity clients such as macOS still accept for a server certificate
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the PEM files of a local cluster's CA live."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    def all(self) -> list[Path]:
        return [self.ca_cert, self.server_cert, self.server_key, self.client_cert, self.client_key]


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` with ``mode`` from the first byte on (a key is never readable by others,
    not even for a moment), then move it into place."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _still_valid(files: TlsFiles, now: dt.datetime) -> bool:
    try:
        certs = [x509.load_pem_x509_certificate(p.read_bytes()) for p in (files.ca_cert, files.server_cert)]
        certs.append(x509.load_pem_x509_certificate(files.client_cert.read_bytes()))
        if not (files.server_key.exists() and files.client_key.exists()):
            return False
    except (OSError, ValueError):
        return False
    return all(c.not_valid_after_utc - RENEW_BEFORE > now for c in certs)


def ensure_certificates(files: TlsFiles, *, client_name: str = "hakeeper") -> bool:
    """Make the CA, server and client certificates unless valid ones exist; True when made."""
    now = dt.datetime.now(dt.UTC)
    if _still_valid(files, now):
        return False
    files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hakeeper local cluster CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        organization: str, usages: list[x509.ObjectIdentifier], san: list[x509.GeneralName] | None
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    # No certificate has a CN (identities are in the SAN and in etcd's users):
    # * etcd answers 400 to a JSON gateway request whose client certificate has a CN (etcd
    #   would ignore it for authentication and refuses to pretend otherwise, 3.4.21+/3.5.5+);
    # * etcd 3.4's gateway dials etcd's own gRPC port with the *server* certificate as its client
    #   certificate, so that one must also be valid for client authentication; without a CN
    #   it cannot be mistaken for an etcd user either.
    server, server_key = leaf(
        "hakeeper etcd server",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))],
    )
    client, client_key = leaf(client_name, [ExtendedKeyUsageOID.CLIENT_AUTH], None)
    pem = serialization.Encoding.PEM
    _write(files.server_key, _key_pem(server_key), 0o600)
    _write(files.client_key, _key_pem(client_key), 0o600)
    _write(files.server_cert, server.public_bytes(pem), 0o644)
    _write(files.client_cert, client.public_bytes(pem), 0o644)
    _write(files.ca_cert, ca.public_bytes(pem), 0o644)
    return True
