"""Certificates for TLS tests, made by the tests (the `cryptography` package): a CA, a server
certificate for localhost / 127.0.0.1, client certificates named after principals, and one
client certificate from another CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Pem:
    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# Subjects a client could get a careless CA to sign, each naming "alice" besides its own CN.
POSING_SUBJECTS = {
    "two-cns": [(NameOID.COMMON_NAME, "bob"), (NameOID.COMMON_NAME, "alice")],
    "o-poses": [(NameOID.ORGANIZATION_NAME, "x,CN=alice"), (NameOID.COMMON_NAME, "bob")],
    # RFC 2253 "CN=alice,O=x\\\\,CN=bob": the comma after an escaped backslash ends the O
    "backslash": [
        (NameOID.COMMON_NAME, "bob"),
        (NameOID.ORGANIZATION_NAME, "x\\"),
        (NameOID.COMMON_NAME, "alice"),
    ],
}
# openssl's prompt order (O, CN, emailAddress): its RFC 2253 subject does not start with the CN.
CAROL = [(NameOID.ORGANIZATION_NAME, "Acme, Inc"), (NameOID.COMMON_NAME, "carol"),
         (NameOID.EMAIL_ADDRESS, "carol@acme.example")]  # fmt: skip


def _issue(
    name: str | list[tuple[x509.ObjectIdentifier, str]],
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    attributes = [(NameOID.COMMON_NAME, name)] if isinstance(name, str) else name
    subject = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Certs:
    ca: bytes
    server: Pem
    clients: dict[str, Pem]
    stranger: Pem  # signed by another CA
    files: dict[str, Path]


def make_certs(out: Path) -> Certs:
    """A CA, a server certificate, clients alice, bob, "alice\\n" and the posing subjects
    (`POSING_SUBJECTS`), and a stranger, written
    under `out` (`files`: ca.pem, server.pem, server.key)."""
    ca_key = _key()
    ca = _issue("seqserve test CA", ca_key, None, ca=True)
    issuer = (ca.subject, ca_key)

    def leaf(name, *, server: bool = False, by=issuer) -> Pem:  # type: ignore[no-untyped-def]
        key = _key()
        cert = _issue(name, key, by, server=server)
        return Pem(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))

    other_key = _key()
    other = _issue("another CA", other_key, None, ca=True)
    certs = Certs(
        ca=ca.public_bytes(serialization.Encoding.PEM),
        server=leaf("localhost", server=True),
        # "alice\n": signed by the CA, but a name that cannot be a principal (nor alice)
        clients={name: leaf(name) for name in ("alice", "bob", "alice\n")}
        | {key: leaf(subject) for key, subject in POSING_SUBJECTS.items()}
        | {"carol": leaf(CAROL)},
        stranger=leaf("mallory", by=(other.subject, other_key)),
        files={},
    )
    for name, data in (("ca.pem", certs.ca), ("server.pem", certs.server.cert),
                       ("server.key", certs.server.key)):  # fmt: skip
        (out / name).write_bytes(data)
        certs.files[name] = out / name
    return certs
