"""TLS on the client side: contexts, certificates chosen by SNI, and certificates reloaded when
their files change.

One `TLSServer` per process. The one the workers use is built in the master before it forks
(gunicorn.conf.py), so every worker shares its *session context*: the SSLContext every
connection starts from, which holds the session-ticket keys (OpenSSL encrypts and decrypts
tickets with the context a connection started from, even after SNI switched it to a
certificate's context). A session a client got from one worker therefore resumes on any
other, and across certificate reloads, for the life of the master.

Each certificate pair gets its own context (same settings, its chain and key); the SNI
callback, run during the ClientHello on the worker's event loop, points the connection at
the pair whose SAN names match (exact, then `*.` wildcards one label deep), else at the
default pair (`tls.cert`/`tls.key`). `refresh()` stats the files (no read when nothing
changed) and loads a changed pair for the next handshakes; a pair that does not load is
refused and the old one stays (`errors`).
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from gol7lb.config import ConfigError, Settings, TlsSettings

log = logging.getLogger("gol7lb.tls")

# ALPN, in the server's order of preference: "h2" goes first when http2.enabled
# (alpn_protocols), so a client that offers both speaks HTTP/2 (http2.py).
ALPN_PROTOCOLS = ["http/1.1"]
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def alpn_protocols(http2: bool) -> list[str]:
    """What ALPN offers: h2 first when the worker speaks HTTP/2."""
    return (["h2"] if http2 else []) + ALPN_PROTOCOLS


@dataclass(frozen=True)
class Source:
    """A certificate pair to serve and where it comes from ("file": the settings; "acme":
    the ACME storage directory)."""

    cert: str
    key: str
    source: str = "file"


@dataclass(frozen=True)
class CertInfo:
    """What /status and the metrics say about a served certificate."""

    names: tuple[str, ...]
    not_after: float  # Unix time
    source: str
    file: str

    def describe(self) -> dict[str, Any]:
        return {"names": list(self.names), "not_after": self.not_after,
                "source": self.source, "file": self.file}


@dataclass
class Loaded:
    """A pair loaded into its own context, and the file signatures it was loaded from."""

    context: ssl.SSLContext
    info: CertInfo
    signature: tuple[Any, ...]
    dns_names: tuple[str, ...] = field(default=())


def new_context(tls: TlsSettings) -> ssl.SSLContext:
    """A server context with the settings every pair shares (version, ciphers, ALPN, mTLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[tls.min_version]
    # No renegotiation: a read then never has to wait for a write, and it is a DoS vector.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    if tls.ciphers:
        try:
            context.set_ciphers(tls.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"invalid setting tls.ciphers = {tls.ciphers!r}: OpenSSL "
                              "accepts no cipher from it") from None
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    if tls.client_ca:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"invalid setting tls.client_ca = {tls.client_ca!r}: cannot "
                              f"load it: {_reason(e)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror and not isinstance(error, ssl.SSLError):
        return error.strerror
    return str(error) or type(error).__name__


def signature(*paths: str) -> tuple[Any, ...]:
    """What tells a changed file: inode, size and modification time of each (following
    symlinks, so a Kubernetes secret's swapped `..data` link counts); None when missing."""
    found: list[Any] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
            continue
        found.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_dev))
    return tuple(found)


def read_info(cert_path: str, source: str) -> tuple[CertInfo, tuple[str, ...], Any]:
    """The leaf certificate's names and notAfter; ConfigError naming the file if it is not a
    PEM certificate."""
    try:
        data = Path(cert_path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read certificate {cert_path}: {_reason(e)}") from None
    try:
        leaf = x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError):
        raise ConfigError(f"cannot load certificate {cert_path}: not a PEM certificate") \
            from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    if not dns and not ips:  # an old certificate without SAN: its common name
        dns = tuple(str(a.value).lower() for a in
                    leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    not_after = leaf.not_valid_after_utc.replace(tzinfo=datetime.UTC).timestamp()
    return CertInfo(dns + ips, not_after, source, cert_path), dns, leaf


def load_pair(tls: TlsSettings, pair: Source) -> Loaded:
    """Load one pair into its own context; ConfigError naming the file that does not load."""
    sig = signature(pair.cert, pair.key)
    info, dns, leaf = read_info(pair.cert, pair.source)
    try:
        key_data = Path(pair.key).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key {pair.key}: {_reason(e)}") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"cannot load key {pair.key}: not an unencrypted PEM private key") \
            from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != \
            leaf.public_key().public_bytes(encoding, public):
        raise ConfigError(f"cannot load key {pair.key}: it does not match certificate "
                          f"{pair.cert}")
    context = new_context(tls)
    try:
        context.load_cert_chain(pair.cert, pair.key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load certificate {pair.cert} with key {pair.key}: "
                          f"{_reason(e)}") from None
    return Loaded(context, info, sig, dns)


def settings_sources(settings: TlsSettings) -> list[Source]:
    """The pairs the settings name: the default first."""
    if not settings.enabled:
        return []
    return [Source(settings.cert, settings.key)] + [
        Source(p.cert, p.key) for p in settings.certificates]


def check_pairs(settings: Settings, running: Settings | None) -> None:
    """A reloaded configuration's pairs that the running one does not name must load
    (ConfigError naming the file); the pairs it already serves are followed by the workers
    and the certificate watcher, whatever their files hold now."""
    if not settings.tls.enabled:
        return
    known = set(settings_sources(running.tls)) if running is not None else set()
    for source in settings_sources(settings.tls):
        if source not in known:
            load_pair(settings.tls, source)


def acme_sources(storage: str, names: Sequence[str]) -> list[Source]:
    """Pairs the ACME client stored for `names`: `{storage}/certificates/NAME/{cert,key}.pem`,
    those complete on disk (an order under way has none yet; a name no longer configured is
    not served)."""
    if not storage:
        return []
    root = Path(storage) / "certificates"
    found = []
    for name in names:
        cert, key = root / name / "cert.pem", root / name / "key.pem"
        if cert.is_file() and key.is_file():
            found.append(Source(str(cert), str(key), "acme"))
    return found


def acme_storage(settings: Settings) -> str:
    """The ACME storage directory, "" when ACME is off (then no challenge is answered)."""
    return settings.acme.storage if settings.acme.domains else ""


def all_sources(settings: Settings) -> list[Source]:
    """What a process serves: the settings' pairs, then the ACME storage's."""
    return settings_sources(settings.tls) + acme_sources(acme_storage(settings),
                                                         settings.acme.domains)


class TLSServer:
    """The certificates one process serves, and the session context connections start from.

    `sources` is called on every refresh for the pairs to serve (so ACME's new certificates
    join without a restart); the first is the default. Not thread-safe: the worker's loop
    thread alone wraps, handshakes and refreshes.
    """

    def __init__(self, tls: TlsSettings, sources: Callable[[], Sequence[Source]],
                 strict: bool = True) -> None:
        self.tls = tls
        self.sources = sources
        self.loaded: dict[Source, Loaded] = {}
        # pairs whose files were refused: the files' signature then, and why
        self.errors: dict[Source, tuple[tuple[Any, ...], str]] = {}
        self.order: list[Source] = []
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        self.default: ssl.SSLContext | None = None
        self.version = 0  # bumped whenever what is served changed
        self.alpn = ALPN_PROTOCOLS  # a worker sets its own (use_alpn: http2.enabled)
        self.refresh(strict=strict)
        # The context every connection starts from: it holds the session-ticket keys. Its
        # own certificate is never served (the SNI callback always picks), but OpenSSL
        # wants one.
        self.session_context = new_context(tls)
        if self.order and self.order[0] in self.loaded:
            first = self.order[0]
            self.session_context.load_cert_chain(first.cert, first.key)
        self.session_context.sni_callback = self._select

    @classmethod
    def from_settings(cls, settings: Settings, strict: bool = True) -> TLSServer:
        """For settings with TLS on; ConfigError (one line naming the file) when a pair named
        in them does not load (`strict`; else it is in `errors`)."""
        return cls(settings.tls, lambda: all_sources(settings), strict)

    def refresh(self, strict: bool = False) -> list[str]:
        """Load what changed on disk; returns the errors new since the last look (a bad pair
        is said once, not on every look). `strict`: raise the first error (at start)."""
        sources = list(dict.fromkeys(self.sources()))
        new_errors: list[str] = []
        changed = sources != self.order
        for src in sources:
            old = self.loaded.get(src)
            sig = signature(src.cert, src.key)
            if old is not None and old.signature == sig:
                self.errors.pop(src, None)  # back to the files it serves
                continue
            refused = self.errors.get(src)
            if refused is not None and refused[0] == sig:
                continue  # still the same bad files: neither read nor said again
            try:
                self.loaded[src] = load_pair(self.tls, src)
                self.loaded[src].context.set_alpn_protocols(self.alpn)
            except ConfigError as e:
                if strict:
                    raise
                self.errors[src] = (sig, str(e))
                new_errors.append(str(e))
                continue
            self.errors.pop(src, None)
            changed = True
        for gone in set(self.loaded) - set(sources):
            del self.loaded[gone]
            changed = True
        for gone in set(self.errors) - set(sources):
            del self.errors[gone]
        if changed:
            self._index(sources)
        return new_errors

    def _index(self, sources: list[Source]) -> None:
        self.order = sources
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        default = None
        for src in sources:
            loaded = self.loaded.get(src)
            if loaded is None:
                continue
            if default is None:
                default = loaded.context
            for name in loaded.dns_names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], loaded.context)
                else:
                    exact.setdefault(name, loaded.context)
        self.exact, self.wildcard = exact, wildcard
        if default is not None:
            self.default = default
        self.version += 1

    def select(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for an SNI name: an exact SAN name, else a wildcard one label deep,
        else the default pair's."""
        if server_name:
            name = server_name.lower().rstrip(".")
            context = self.exact.get(name)
            if context is None:
                context = self.wildcard.get(name.partition(".")[2])
            if context is not None:
                return context
        return self.default

    def _select(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _context: ssl.SSLContext) -> int | None:
        context = self.select(server_name)
        if context is not None:
            sslobj.context = context
        return None

    def use_alpn(self, protocols: list[str]) -> None:
        """Offer these protocols on every context, now and for pairs loaded later (a worker
        follows its own configuration's http2.enabled)."""
        self.alpn = protocols
        for context in [self.session_context] + [p.context for p in self.loaded.values()]:
            context.set_alpn_protocols(protocols)

    def wrap(self, sock: Any) -> ssl.SSLSocket:
        """A server-side TLS socket over an accepted non-blocking one; the caller drives the
        handshake (`do_handshake` until it stops wanting to read or write)."""
        return self.session_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)

    def infos(self) -> list[CertInfo]:
        """The certificates served now, in order (the default first)."""
        return [self.loaded[s].info for s in self.order if s in self.loaded]

    def error_lines(self) -> list[str]:
        return [message for _sig, message in self.errors.values()]


def status_part(server: TLSServer | None, acme: dict[str, Any] | None = None) -> dict[str, Any]:
    """/status `tls`: the certificates served and the ACME client's state (filled by it)."""
    return {"certificates": [i.describe() for i in server.infos()] if server else [],
            "acme": acme if acme is not None else {"pending": [], "last_error": None}}
