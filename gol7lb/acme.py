"""Automatic certificates (ACME, RFC 8555) for every `acme.domains` name, kept in `acme.storage`.

The `acme` helper process of the master (started like the supervisor, restarted if it dies)
runs a `Keeper`: a name without a valid certificate in storage, or one due for renewal
(`acme.renew_before_days` before it expires), gets a new one through HTTP-01; the answers go
to files in storage (challenges.py) that any worker serves on `tls.redirect_port`. The
protocol is the `acme` library's (certbot's), never a hand-written client.

Why a process of its own and not a thread of the supervisor: ordering blocks for seconds on
the network and on the ACME server's validation, pulls in the `acme`/`cryptography` stack,
and may fail in ways health checks must never feel; as a ManagedChild it is restarted (with
backoff) by the same mechanism as every helper, and an LB without `acme.domains` never starts
it.

Storage (kept across restarts; instances that share it share the certificates):
    account/key.pem                the ACME account key (the account is found again by it)
    certificates/NAME/cert.pem     the chain, leaf first   } written atomically, the pair the
    certificates/NAME/key.pem      its private key         } TLS side loads (certificate_files)
    certificates/NAME/meta.json    the directory URL it came from, when
    challenges/TOKEN               pending HTTP-01 answers (challenges.py)
    lock                           flock()ed while an instance orders: one at a time

A failed order is retried with backoff (per name) while the old certificate stays in place;
the error goes to the log and to this instance's status file (`status()`, for `/status`
`tls.acme`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gol7lb import challenges, logfmt, rundir
from gol7lb.config import AcmeSettings, Settings
from gol7lb.counters import SharedCounters

if TYPE_CHECKING:
    from acme import client
    from josepy.jwk import JWKEC

log = logging.getLogger("gol7lb.acme")

RECHECK_SECONDS = 12 * 3600.0  # look at storage again at least this often (files replaced by hand)
BACKOFF_FIRST_SECONDS = 60.0  # a failed order is retried after 1 min, 2, 4... (per name)
BACKOFF_MAX_SECONDS = 6 * 3600.0
LOCK_POLL_SECONDS = 1.0  # while another instance orders, look again this often
ORDER_SECONDS = 90  # one order (validation and issuance) may take this long
NETWORK_TIMEOUT = 30  # seconds per HTTP request to the ACME server
STATUS_FILE = "acme-status.json"


# -- storage -------------------------------------------------------------------------------


def certificate_dir(storage: str, name: str) -> Path:
    return Path(storage) / "certificates" / name


def certificate_files(settings: Settings) -> list[tuple[str, str]]:
    """(cert.pem, key.pem) paths of every `acme.domains` name that has both files in storage,
    in `acme.domains` order: what the TLS side loads (and watches) beside `tls.certificates`.
    A name still waiting for its first certificate is not listed yet."""
    acme = settings.acme
    pairs = []
    for name in acme.domains if acme.storage else ():
        folder = certificate_dir(acme.storage, name)
        cert, key = folder / "cert.pem", folder / "key.pem"
        if cert.is_file() and key.is_file():
            pairs.append((str(cert), str(key)))
    return pairs


def _write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Stored:
    """A certificate found in storage for one name."""

    name: str
    not_before: float  # Unix time
    not_after: float
    serial: int
    directory: str  # the ACME directory it came from ("" when unknown)

    def renew_at(self, renew_before_days: int) -> float:
        return self.not_after - renew_before_days * 86400.0


def load_stored(storage: str, name: str) -> Stored | None:
    """The certificate stored for `name` when it is usable: it parses, its key matches, it
    covers the name and has not expired. None otherwise (then it is ordered again)."""
    folder = certificate_dir(storage, name)
    try:
        chain = x509.load_pem_x509_certificates((folder / "cert.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), None)
    except (OSError, ValueError, TypeError):
        return None
    leaf = chain[0]
    if leaf.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo):
        return None
    try:
        names = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        return None
    if name not in [n.lower() for n in names]:
        return None
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= time.time():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        directory = str(meta.get("directory", ""))
    except (OSError, ValueError, AttributeError):
        directory = ""
    return Stored(name, leaf.not_valid_before_utc.timestamp(), not_after, leaf.serial_number,
                  directory)


def _store(storage: str, name: str, key_pem: bytes, chain_pem: bytes, directory: str) -> None:
    """The new pair replaces the old one: both files are written aside first, then renamed
    back to back, so a reader sees a mismatched pair only for that instant (and the TLS side
    keeps the old pair when a load fails)."""
    folder = certificate_dir(storage, name)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = []
    try:
        for data, mode in ((key_pem, 0o600), (chain_pem, 0o644)):
            fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            staged.append(temporary)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, mode)
        os.replace(staged[0], folder / "key.pem")
        os.replace(staged[1], folder / "cert.pem")
    finally:
        for temporary in staged:
            Path(temporary).unlink(missing_ok=True)
    _write_atomically(folder / "meta.json", json.dumps(
        {"directory": directory, "obtained_at": time.time()}).encode(), 0o644)


def _account_key(storage: str) -> JWKEC:
    """The account key from storage, made (ECDSA P-256) the first time."""
    from josepy.jwk import JWKEC

    path = Path(storage) / "account" / "key.pem"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        _write_atomically(path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        log.info("acme: made a new account key in %s", path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AcmeError(f"{path} is not an ECDSA key")
    return JWKEC(key=key)


# -- the lock ------------------------------------------------------------------------------


@contextlib.contextmanager
def storage_lock(storage: str) -> Iterator[bool]:
    """Holds `storage/lock` (flock, released by the kernel even on kill -9) when it yields
    True; False when another instance holds it now. The holder writes its pid in it."""
    Path(storage).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(Path(storage) / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            yield False
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield True
    finally:
        os.close(fd)  # releases the lock


def _withdraw_stale_answers(storage: str) -> None:
    with contextlib.suppress(OSError):
        for entry in challenges.directory(storage).iterdir():
            challenges.withdraw(storage, entry.name)


def lock_holder(storage: str) -> str:
    try:
        return (Path(storage) / "lock").read_text().strip() or "?"
    except OSError:
        return "?"


# -- status --------------------------------------------------------------------------------


def status_path() -> str | None:
    """This instance's ACME status file, in its run directory (found from any of its
    processes through the environment the master set before it started them)."""
    metrics_dir = os.environ.get(rundir.METRICS_ENV)
    return os.path.join(os.path.dirname(metrics_dir), STATUS_FILE) if metrics_dir else None


def status(path: str | None = None) -> dict[str, Any]:
    """`/status` `tls.acme`: {"pending": [names being ordered or waiting to retry],
    "last_error": str|null}. ACME off (or not started yet): nothing pending, no error."""
    path = path or status_path()
    try:
        document = json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        document = {}
    return {"pending": list(document.get("pending", [])),
            "last_error": document.get("last_error")}


# -- ordering ------------------------------------------------------------------------------


class AcmeError(Exception):
    """An order failed; str() says why, for the log and /status."""


def describe(error: BaseException) -> str:
    """One line for an ACME failure: the CA's problem detail where there is one."""
    from acme import errors, messages

    if isinstance(error, errors.ValidationError):
        details = []
        for authz in error.failed_authzrs:
            for chall in authz.body.challenges:
                if chall.error is not None:
                    details.append(f"{authz.body.identifier.value}: {chall.error}")
        return "validation failed: " + ("; ".join(details) or "no detail")
    if isinstance(error, messages.Error):
        return str(error)
    if isinstance(error, errors.TimeoutError):
        return f"the ACME server did not finish the order within {ORDER_SECONDS}s"
    text = str(error) or type(error).__name__
    errno_at = text.find("[Errno ")
    if isinstance(error, OSError) and errno_at >= 0:  # requests' connection errors nest deep
        return "cannot reach the ACME server: " + text[errno_at:].split('"')[0].rstrip(")")
    return text if len(text) < 300 else text[:297] + "..."


class Session:
    """One ACME client with its account, for the orders of one pass. The `acme` library is
    imported here, in the acme process only: the master and the workers (which list the
    certificate files) never load it."""

    client: client.ClientV2

    def __init__(self, acme: AcmeSettings) -> None:
        from acme import client, errors, messages
        from josepy.jwa import ES256

        self.acme = acme
        key = _account_key(acme.storage)
        # requests' `verify` takes a CA bundle path as well as a bool
        verify: Any = acme.ca_bundle or True
        net = client.ClientNetwork(key, alg=ES256, verify_ssl=verify,
                                   user_agent="gol7lb", timeout=NETWORK_TIMEOUT)
        self.client = client.ClientV2(client.ClientV2.get_directory(acme.directory, net), net)
        registration = messages.NewRegistration.from_data(
            email=acme.email or None, terms_of_service_agreed=True)
        try:
            self.client.new_account(registration)
            log.info("acme: registered a new account with %s", acme.directory)
        except errors.ConflictError as e:  # the key has an account there already: use it
            net.account = messages.RegistrationResource(uri=e.location,
                                                        body=messages.Registration())

    def order(self, name: str) -> tuple[bytes, bytes]:
        """A new key and certificate chain for `name` (HTTP-01); AcmeError or an ACME/network
        exception when it fails."""
        from acme import challenges as acme_challenges
        from acme import crypto_util, messages

        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        order = self.client.new_order(crypto_util.make_csr(key_pem, [name]))
        storage = self.acme.storage
        tokens: list[str] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # the CA remembers an earlier validation
                http01 = next((c for c in authz.body.challenges
                               if isinstance(c.chall, acme_challenges.HTTP01)), None)
                if http01 is None:
                    raise AcmeError(f"the ACME server offers no HTTP-01 challenge for {name}")
                response, validation = http01.response_and_validation(self.client.net.key)
                token = http01.chall.encode("token")
                challenges.publish(storage, token, validation)
                tokens.append(token)
                self.client.answer_challenge(http01, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_SECONDS)
            order = self.client.poll_and_finalize(order, deadline)
        finally:
            for token in tokens:
                challenges.withdraw(storage, token)
        if not order.fullchain_pem:
            raise AcmeError(f"the ACME server gave no certificate for {name}")
        return key_pem, order.fullchain_pem.encode()


class Keeper:
    """Keeps a valid certificate in storage for every name of `acme.domains`.

    `step()` does what is due now and says how long to wait before the next one; `run()`
    loops on it. Per name: the time to look at it again, and its failures in a row."""

    def __init__(self, acme: AcmeSettings | None = None, status_file: str | None = None,
                 stop: threading.Event | None = None,
                 backoff: tuple[float, float] = (BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS),
                 ) -> None:
        self.acme = acme
        self.status_file = status_file
        self.stop = stop or threading.Event()
        self.backoff = backoff
        self._due: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        self._last_error: str | None = None
        self._pending: set[str] = set()
        self._waiting_for: str | None = None  # the lock holder we already logged

    def configure(self, acme: AcmeSettings) -> None:
        """A new configuration: new names are looked at now, the others keep their plan
        (a changed directory or renewal window: all are looked at now)."""
        old = self.acme
        if old is None or (old.directory, old.renew_before_days, old.storage) != (
                acme.directory, acme.renew_before_days, acme.storage):
            self._due.clear()
            self._failures.clear()
        for name in set(self._due) | self._pending | set(self._errors):
            if name not in acme.domains:  # no longer wanted: forget its plan and errors
                self._due.pop(name, None)
                self._failures.pop(name, None)
                self._errors.pop(name, None)
                self._pending.discard(name)
        if not self._errors:
            self._last_error = None
        self.acme = acme
        self._write_status()

    # A certificate is fine when it came from this directory and is not due for renewal.
    def _fine(self, stored: Stored | None, now: float) -> bool:
        assert self.acme is not None
        return (stored is not None and stored.directory in ("", self.acme.directory)
                and now < stored.renew_at(self.acme.renew_before_days))

    def _plan(self, name: str, stored: Stored, now: float) -> None:
        assert self.acme is not None
        self._due[name] = min(stored.renew_at(self.acme.renew_before_days),
                              now + RECHECK_SECONDS)

    def step(self) -> float:
        """Look at every name that is due; order what needs it (holding the lock). Seconds
        until the next name is due."""
        acme = self.acme
        if acme is None or not acme.domains:
            return RECHECK_SECONDS
        now = time.time()
        wanted = []
        for name in acme.domains:
            if self._due.get(name, 0.0) > now:
                continue
            stored = load_stored(acme.storage, name)
            if self._fine(stored, now):
                assert stored is not None
                if name in self._pending:  # another instance got it while we waited
                    log.info("acme: picked up the certificate for %s from %s (valid until %s)",
                             name, acme.storage, _when(stored.not_after))
                else:
                    log.info("acme: %s has a certificate valid until %s; renewal from %s", name,
                             _when(stored.not_after),
                             _when(stored.renew_at(acme.renew_before_days)))
                self._succeeded(name, stored, now)
            else:
                wanted.append((name, stored))
        if wanted:
            self._pending.update(name for name, _ in wanted)
            self._write_status()
            try:
                self._order_all(wanted)
            except OSError as e:  # the storage itself: not writable, disk full...
                for name, old in wanted:
                    self._failed(name, old, f"storage {acme.storage}: {e.strerror or e}")
        self._write_status()
        return max(0.0, min(self._due.get(n, 0.0) for n in acme.domains) - time.time())

    def _order_all(self, wanted: list[tuple[str, Stored | None]]) -> None:
        assert self.acme is not None
        acme = self.acme
        with storage_lock(acme.storage) as mine:
            if not mine:
                holder = lock_holder(acme.storage)
                if self._waiting_for != holder:
                    log.info("acme: another instance (pid %s) is ordering certificates in %s; "
                             "waiting for it", holder, acme.storage)
                    self._waiting_for = holder
                for name, _ in wanted:
                    self._due[name] = time.time() + LOCK_POLL_SECONDS
                return
            self._waiting_for = None
            # Only the lock holder publishes answers: any still there were left by an
            # instance killed while it ordered.
            _withdraw_stale_answers(acme.storage)
            session: Session | None = None
            for name, old in wanted:
                if self.stop.is_set():
                    return
                now = time.time()
                stored = load_stored(acme.storage, name)
                if self._fine(stored, now):  # another instance got it while we waited
                    assert stored is not None
                    log.info("acme: picked up the certificate for %s from %s (valid until %s)",
                             name, acme.storage, _when(stored.not_after))
                    self._succeeded(name, stored, now)
                    continue
                try:
                    if session is None:
                        session = Session(acme)
                    key_pem, chain_pem = session.order(name)
                    _store(acme.storage, name, key_pem, chain_pem, acme.directory)
                except Exception as e:  # any failure: back off, keep the old certificate
                    self._failed(name, old, describe(e))
                    if session is None:  # no account, no server: the others fail alike
                        for other, other_old in wanted:
                            if other != name and self._due.get(other, 0.0) <= now:
                                self._failed(other, other_old, describe(e))
                        return
                    continue
                fresh = load_stored(acme.storage, name)
                if fresh is None:
                    self._failed(name, old, "the certificate received does not load or does "
                                 "not cover the name")
                    continue
                log.info("acme: %s certificate for %s, valid until %s (serial %x)",
                         "renewed the" if old is not None else "obtained a", name,
                         _when(fresh.not_after), fresh.serial)
                self._succeeded(name, fresh, time.time())

    def _succeeded(self, name: str, stored: Stored, now: float) -> None:
        assert self.acme is not None
        self._failures.pop(name, None)
        self._errors.pop(name, None)
        self._pending.discard(name)
        if not self._errors:
            self._last_error = None
        if now >= stored.renew_at(self.acme.renew_before_days):
            # the CA's certificates live shorter than renew_before_days: never loop
            log.warning("acme: the new certificate for %s expires %s, already within "
                        "acme.renew_before_days = %d; next renewal in %d hours", name,
                        _when(stored.not_after), self.acme.renew_before_days,
                        RECHECK_SECONDS // 3600)
            self._due[name] = now + RECHECK_SECONDS
        else:
            self._plan(name, stored, now)

    def _failed(self, name: str, old: Stored | None, reason: str) -> None:
        failures = self._failures.get(name, 0) + 1
        self._failures[name] = failures
        first, most = self.backoff
        delay = min(most, first * 2 ** (failures - 1))
        self._due[name] = time.time() + delay
        self._errors[name] = reason
        self._last_error = f"{name}: {reason}"
        kept = (f"the certificate valid until {_when(old.not_after)} is kept"
                if old is not None else "no certificate yet")
        log.error("acme: could not get a certificate for %s: %s; %s; retrying in %s "
                  "(failure %d)", name, reason, kept, _duration(delay), failures)

    def _write_status(self) -> None:
        if not self.status_file:
            return
        acme_names = self.acme.domains if self.acme is not None else ()
        document = {"pending": [n for n in acme_names if n in self._pending],
                    "last_error": self._last_error}
        with contextlib.suppress(OSError):
            _write_atomically(Path(self.status_file), json.dumps(document).encode(), 0o644)

    def run(self, refresh: Callable[[], object] = lambda: None, tick: float = 1.0) -> None:
        """Until `stop`: follow the configuration (`refresh`, every `tick` seconds at most)
        and do what is due."""
        while not self.stop.is_set():
            refresh()
            wait = self.step()
            self.stop.wait(min(max(wait, 0.05), tick))


def _when(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    return f"{seconds:g}s" if seconds < 120 else f"{seconds / 60:.0f} min"


def run(address: str, authkey: bytes, counters: SharedCounters) -> None:
    """Entry point of the acme process (spawned by the master when `acme.domains` is set,
    restarted if it dies). Follows the running configuration: a reload that adds a name
    orders it."""
    from gol7lb.children import helper_main
    from gol7lb.control import Snapshot
    from gol7lb.manager import ControlClient
    from gol7lb.view import GenerationFollower

    stop = helper_main("acme")
    keeper = Keeper(status_file=status_path(), stop=stop)

    warned: list[bool] = []

    def apply(snapshot: Snapshot) -> None:
        settings = snapshot.settings
        logfmt.apply(settings.log)
        if not warned and settings.acme.domains and getattr(
                getattr(settings, "tls", None), "redirect_port", None) == 0:
            warned.append(True)
            log.warning("acme: tls.redirect_port is 0, so this LB cannot answer the CA's "
                        "HTTP-01 checks; orders succeed only if another instance sharing %s, "
                        "or a proxy in front, serves /.well-known/acme-challenge/",
                        settings.acme.storage)
        keeper.configure(settings.acme)

    client_ = ControlClient(address, authkey)
    follower = GenerationFollower(lambda: counters.generation, client_.snapshot, apply,
                                  who="acme")
    log.info("acme started (pid %d)", os.getpid())
    while keeper.acme is None and not stop.is_set():  # the first configuration
        follower.poll()
        stop.wait(0.25)
    keeper.run(follower.poll)
    sys.exit(0)
