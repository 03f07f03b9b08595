"""The default certificate of an LB that only has ACME names (`acme.domains`, no `tls.cert`).

PORT serves HTTPS as soon as the LB starts, but the ACME certificates arrive later (the first
order takes seconds to minutes) and a client without SNI, or with a name the LB has no
certificate for, still needs one to talk to. As with nginx's and HAProxy's usual "default
server" certificate, that one is self-signed for a name no client asks for
(`gol7lb-default.invalid`), so SNI always prefers the ACME certificate for a real name. It
is made once, kept in the ACME storage directory beside the others, and made again only when
it is missing, unreadable or about to expire.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gol7lb.errors import ConfigError

NAME = "gol7lb-default.invalid"  # RFC 6761: .invalid never resolves, so no client asks for it
VALID_DAYS = 3650
RENEW_WITHIN = datetime.timedelta(days=30)


def paths(storage: str) -> tuple[str, str]:
    folder = Path(storage) / "default"
    return str(folder / "cert.pem"), str(folder / "key.pem")


def ensure(storage: str) -> tuple[str, str]:
    """(cert, key) file paths of the default pair in `storage`, made when needed; a
    ConfigError naming the directory when it cannot be written."""
    cert, key = paths(storage)
    if _usable(cert, key):
        return cert, key
    try:
        _write(Path(cert).parent, *_make())
    except OSError as e:
        raise ConfigError(f"invalid setting acme.storage = {storage!r}: cannot write the "
                          f"default certificate there ({e.strerror or e})") from None
    return cert, key


def _usable(cert: str, key: str) -> bool:
    try:
        found = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    left = found.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left > RENEW_WITHIN


def _make() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _write(folder: Path, cert: bytes, key: bytes) -> None:
    """Key first, then the certificate, each replaced whole (a reader never sees half)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data, mode in (("key.pem", key, 0o600), ("cert.pem", cert, 0o644)):
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(temporary, mode)
            os.replace(temporary, folder / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
