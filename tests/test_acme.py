"""Automatic certificates end to end against a real ACME server: Debian's pebble on 127.0.0.1,
names resolved by a real DNS server (tests/dnsserver.py), HTTP-01 answered from the ACME
storage (gol7lb.challenges) on the port pebble validates. The LB's `acme` helper process
obtains, keeps, renews; a failing CA is retried with backoff while the old certificate stays;
the storage lock keeps a second instance from ordering at the same time."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store

from gol7lb import acme
from gol7lb.config import AcmeSettings, ConfigError, load_settings
from tests.acmeserver import PEBBLE, ChallengeAnswerer, Pebble
from tests.dnsserver import TestDNS
from tests.procs import HELPERS_START, wait_until

pytestmark = pytest.mark.skipif(PEBBLE is None, reason="pebble is not installed "
                                "(apt-get install pebble; tests/run.sh does)")
NAMES = ("a.acme.test", "b.acme.test")


class Env:
    """A DNS server, pebble, and an ACME storage directory for one test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.dns = TestDNS(tmp_path)
        for name in NAMES:
            self.dns.set_a(name, ["127.0.0.1"])
        self.pebble = Pebble(tmp_path, self.dns.address).start()
        self.storage = str(tmp_path / "acme")

    def env(self, **more: str) -> dict[str, str]:
        """The LB's [acme] settings, as environment variables."""
        return {"GOL7LB_ACME_DOMAINS": ",".join(NAMES),
                "GOL7LB_ACME_DIRECTORY": self.pebble.directory,
                "GOL7LB_ACME_CA_BUNDLE": str(self.pebble.ca_bundle),
                "GOL7LB_ACME_STORAGE": self.storage,
                "GOL7LB_ACME_EMAIL": "ops@acme.test", **more}

    def settings(self, **more: str) -> AcmeSettings:
        return load_settings({"GOL7LB_BACKENDS": "http://127.0.0.1:9", **self.env(**more)}).acme

    def close(self) -> None:
        self.pebble.stop()
        self.dns.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


@pytest.fixture
def answerer(env: Env) -> Iterator[ChallengeAnswerer]:
    """HTTP-01 answers on pebble's validation port, from the storage (what the LB's
    tls.redirect_port listener does)."""
    server = ChallengeAnswerer(env.pebble.http_port, [env.storage])
    yield server
    server.close()


def stored(storage: str, name: str) -> acme.Stored:
    found = acme.load_stored(storage, name)
    assert found is not None, f"no valid certificate for {name} in {storage}"
    return found


def serials(storage: str) -> dict[str, int]:
    return {name: stored(storage, name).serial for name in NAMES}


def all_stored(storage: str) -> bool:
    return all(acme.load_stored(storage, name) is not None for name in NAMES)


def lb_acme_status(lb) -> dict | None:
    """/status `tls.acme` as this LB's acme process writes it (in the LB's run directory)."""
    for base in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir()):
        for path in Path(base or tempfile.gettempdir()).glob(
                f"gol7lb-{lb.pid}-*/{acme.STATUS_FILE}"):
            return acme.status(str(path))
    return None


def verify_chain(pebble: Pebble, storage: str, name: str) -> None:
    """cert.pem is leaf + intermediate, valid for `name` up to pebble's root (from its
    management port), and key.pem is the leaf's key."""
    folder = acme.certificate_dir(storage, name)
    leaf, *intermediates = x509.load_pem_x509_certificates((folder / "cert.pem").read_bytes())
    assert intermediates, "the chain has no intermediate"
    assert intermediates[0] == x509.load_pem_x509_certificate(pebble.intermediate_pem().encode())
    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    verifier = PolicyBuilder().store(Store([root])).build_server_verifier(x509.DNSName(name))
    chain = verifier.verify(leaf, intermediates)
    assert chain[-1] == root
    key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), None)
    assert key.public_key() == leaf.public_key()


# -- settings ----------------------------------------------------------------------------------


def test_acme_settings_are_validated_and_storage_defaults_to_a_state_directory(tmp_path):
    base = {"GOL7LB_BACKENDS": "http://127.0.0.1:9"}
    settings = load_settings({**base, "GOL7LB_ACME_DOMAINS": "Example.COM, www.example.com",
                              "XDG_STATE_HOME": str(tmp_path / "state")})
    assert settings.acme.domains == ("example.com", "www.example.com")
    assert settings.acme.storage == str(tmp_path / "state" / "gol7lb" / "acme")
    assert settings.acme.renew_before_days == 30
    home = load_settings({**base, "GOL7LB_ACME_DOMAINS": "example.com", "HOME": "/home/x"})
    assert home.acme.storage == "/home/x/.local/state/gol7lb/acme"
    assert load_settings(base).acme.storage == ""  # ACME off: no storage, nothing answered
    for bad, needle in (("GOL7LB_ACME_DOMAINS", "*.example.com"),
                        ("GOL7LB_ACME_DOMAINS", "10.0.0.1"),
                        ("GOL7LB_ACME_DIRECTORY", "http://ca.example/dir"),
                        ("GOL7LB_ACME_RENEW_BEFORE_DAYS", "0"),
                        ("GOL7LB_ACME_EMAIL", "not an address")):
        with pytest.raises(ConfigError, match=bad.removeprefix("GOL7LB_ACME_").lower()):
            load_settings({**base, "GOL7LB_ACME_DOMAINS": "example.com", bad: needle})
    with pytest.raises(ConfigError, match=r"acme\.ca_bundle = .*cannot read"):
        load_settings({**base, "GOL7LB_ACME_DOMAINS": "example.com",
                       "GOL7LB_ACME_CA_BUNDLE": str(tmp_path / "missing.pem")})


def test_a_bad_acme_setting_stops_the_start_with_one_line(lb_factory, tmp_path):
    lb = lb_factory({"GOL7LB_BACKENDS": "http://127.0.0.1:9",
                     "GOL7LB_ACME_DOMAINS": "*.example.com"}, ready=False)
    assert lb.wait(30) != 0
    lines = [line for line in lb.output().splitlines() if "acme.domains" in line]
    assert len(lines) == 1, lb.output()


# -- through the LB's acme process -------------------------------------------------------------


@pytest.mark.slow
def test_lb_obtains_keeps_across_restart_and_renews(env, answerer, lb_factory, backend_factory):
    """Two names get verified certificates; a restart orders nothing; a reload that puts them
    inside renew_before_days renews them, once."""
    backends = {"GOL7LB_BACKENDS": f"http://127.0.0.1:{backend_factory().port}"}
    first = lb_factory({**backends, **env.env()})
    wait_until(lambda: all_stored(env.storage), timeout=HELPERS_START)
    for name in NAMES:
        verify_chain(env.pebble, env.storage, name)
    assert env.pebble.orders() == 2
    assert sorted(acme.certificate_files(load_settings(
        {**backends, **env.env()}))) == sorted(
        (str(acme.certificate_dir(env.storage, n) / "cert.pem"),
         str(acme.certificate_dir(env.storage, n) / "key.pem")) for n in NAMES)
    wait_until(lambda: first.output().count("acme: obtained a certificate for") == 2)
    wait_until(lambda: lb_acme_status(first) == {"pending": [], "last_error": None})
    before = serials(env.storage)
    first.stop()

    # the window comes from a file, so a reload can change it
    config = env.tmp / "lb.toml"
    config.write_text("[reload]\nwatch = false\n[acme]\nrenew_before_days = 30\n")
    again = lb_factory({**backends, **env.env(), "GOL7LB_CONFIG": str(config)})
    wait_until(lambda: again.output().count("has a certificate valid until") == 2,
               timeout=HELPERS_START)
    assert env.pebble.orders() == 2, "a restart ordered again"
    assert serials(env.storage) == before

    # pebble's certificates live 5 years: a 10-year window puts them due now
    config.write_text("[reload]\nwatch = false\n[acme]\nrenew_before_days = 3650\n")
    again.signal(signal.SIGHUP)
    wait_until(lambda: again.output().count("acme: renewed the certificate for") == 2,
               timeout=HELPERS_START)
    after = serials(env.storage)
    assert all(after[n] != before[n] for n in NAMES), (before, after)
    for name in NAMES:
        verify_chain(env.pebble, env.storage, name)
    assert "already within acme.renew_before_days = 3650" in again.output()
    time.sleep(2)  # a renewal loop would show within this
    assert env.pebble.orders() == 4
    assert serials(env.storage) == after


@pytest.mark.slow
def test_two_instances_on_one_storage_order_each_name_once(env, answerer, lb_factory,
                                                           backend_factory):
    backends = {"GOL7LB_BACKENDS": f"http://127.0.0.1:{backend_factory().port}"}
    lbs = [lb_factory({**backends, **env.env()}, ready=False) for _ in range(2)]
    for lb in lbs:
        lb.wait_ready()
    wait_until(lambda: all_stored(env.storage), timeout=HELPERS_START)
    # the second instance waited for the lock, or found the certificates at its first look
    wait_until(lambda: all(("has a certificate valid until" in lb.output()
                            or "picked up the certificate" in lb.output()
                            or "obtained a certificate" in lb.output()) for lb in lbs),
               timeout=HELPERS_START)
    time.sleep(1)  # an order under way would show by then
    assert env.pebble.orders() == 2, [lb.output() for lb in lbs]


@pytest.mark.slow
def test_an_instance_waits_for_the_lock_and_picks_up_what_the_holder_got(env, answerer,
                                                                         lb_factory,
                                                                         backend_factory):
    """The test is the other instance: it holds the lock and orders; the LB orders nothing
    while it waits, then takes the certificates from storage."""
    backends = {"GOL7LB_BACKENDS": f"http://127.0.0.1:{backend_factory().port}"}
    settings = env.settings()
    with acme.storage_lock(env.storage) as held:
        assert held
        lb = lb_factory({**backends, **env.env()})
        wait_until(lambda: "is ordering certificates in" in lb.output(), timeout=HELPERS_START)
        assert lb_acme_status(lb) == {"pending": list(NAMES), "last_error": None}
        assert env.pebble.orders() == 0
        session = acme.Session(settings)
        for name in NAMES:
            key_pem, chain_pem = session.order(name)
            acme._store(env.storage, name, key_pem, chain_pem, settings.directory)
        assert env.pebble.orders() == 2
    wait_until(lambda: lb.output().count("picked up the certificate for") == 2, timeout=30)
    assert env.pebble.orders() == 2
    wait_until(lambda: lb_acme_status(lb) == {"pending": [], "last_error": None})


# -- failure and backoff (the keeper in this process, with a short backoff) --------------------


class Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "could not get a certificate" in text:
            self.times.append(time.monotonic())
            self.lines.append(text)


@pytest.mark.slow
def test_a_failing_ca_is_retried_with_backoff_and_the_old_certificate_stays(env, answerer,
                                                                             tmp_path):
    status_file = str(tmp_path / "acme-status.json")
    keeper = acme.Keeper(status_file=status_file, backoff=(0.5, 4.0))
    keeper.configure(env.settings())
    keeper.step()
    assert all_stored(env.storage)
    assert acme.status(status_file) == {"pending": [], "last_error": None}
    files = {n: (acme.certificate_dir(env.storage, n) / "cert.pem").read_bytes() for n in NAMES}

    env.pebble.stop()  # the CA is down
    failures = Failures()
    logging.getLogger("gol7lb.acme").addHandler(failures)
    thread = threading.Thread(target=keeper.run, kwargs={"tick": 0.1}, daemon=True)
    try:
        keeper.configure(env.settings(GOL7LB_ACME_RENEW_BEFORE_DAYS="3650"))  # renew now
        thread.start()
        wait_until(lambda: len(failures.times) >= 2 * 4, timeout=60)
        document = acme.status(status_file)
        assert document["pending"] == list(NAMES)
        assert str(document["last_error"]).startswith(NAMES), document
        assert "cannot reach the ACME server: [Errno 111] Connection refused" in \
            document["last_error"], document
        assert all("is kept" in line for line in failures.lines), failures.lines
        per_name = failures.times[::2]  # both names fail together, one after the other
        gaps = [b - a for a, b in zip(per_name, per_name[1:], strict=False)]
        assert gaps[0] >= 0.4 and gaps[2] >= 1.6 and gaps[2] > gaps[0], gaps  # 0.5, 1, 2...
        for name in NAMES:  # the old certificate is still there, untouched
            assert (acme.certificate_dir(env.storage, name) / "cert.pem").read_bytes() == \
                files[name]

        env.pebble.start()  # back (a new CA: the account is registered again)
        wait_until(lambda: acme.status(status_file) == {"pending": [], "last_error": None},
                   timeout=30)
        for name in NAMES:
            verify_chain(env.pebble, env.storage, name)
            assert (acme.certificate_dir(env.storage, name) / "cert.pem").read_bytes() != \
                files[name]
    finally:
        keeper.stop.set()
        thread.join(30)
        logging.getLogger("gol7lb.acme").removeHandler(failures)
    assert not thread.is_alive()


# -- through the LB's own plain-HTTP listener (tls.redirect_port) ------------------------------


@pytest.mark.slow
def test_lb_answers_http01_on_its_redirect_port_and_serves_the_certificate(env, lb_factory,
                                                                           backend_factory):
    """ACME names alone (no tls.cert) turn HTTPS on: a self-signed default pair until the
    ACME certificates arrive (and for clients without SNI); SNI then picks ACME's."""
    import socket
    import ssl

    backends = {"GOL7LB_BACKENDS": f"http://127.0.0.1:{backend_factory().port}"}
    lb = lb_factory({**backends, **env.env(),
                     "GOL7LB_TLS_REDIRECT_PORT": str(env.pebble.http_port)})
    status = requests.get(lb.admin_url + "/status", timeout=10).json()["tls"]
    assert [c["names"] for c in status["certificates"]][:1] == [["gol7lb-default.invalid"]]
    wait_until(lambda: all_stored(env.storage), timeout=HELPERS_START)
    for name in NAMES:
        verify_chain(env.pebble, env.storage, name)
    root = env.tmp / "pebble-root.pem"
    root.write_text(env.pebble.root_pem())
    context = ssl.create_default_context(cafile=str(root))

    def served_serial(name: str) -> int | None:
        try:
            with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError):
            return None
        return x509.load_der_x509_certificate(der).serial_number if der else None

    for name in NAMES:  # served without a restart
        wait_until(lambda n=name: served_serial(n) == stored(env.storage, n).serial,
                   timeout=30)
    # a client without SNI gets the default pair, never one of the ACME names
    anyone = ssl.create_default_context()
    anyone.check_hostname, anyone.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as raw, \
            anyone.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["gol7lb-default.invalid"]


@pytest.mark.slow
def test_a_name_added_by_a_reload_is_ordered(env, answerer, lb_factory, backend_factory,
                                            tmp_path):
    """The acme process follows the running configuration: a reload that adds a name orders
    that name only."""
    port = backend_factory().port
    config = tmp_path / "lb.toml"

    def write(names: tuple[str, ...]) -> None:
        config.write_text(
            f'[[backends]]\nurl = "http://127.0.0.1:{port}"\n\n[reload]\nwatch = false\n\n'
            f"[acme]\ndomains = {list(names)!r}\n".replace("'", '"'))

    write(NAMES[:1])
    settings = {k: v for k, v in env.env().items() if k != "GOL7LB_ACME_DOMAINS"}
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **settings})
    wait_until(lambda: acme.load_stored(env.storage, NAMES[0]), timeout=HELPERS_START)
    assert acme.load_stored(env.storage, NAMES[1]) is None
    write(NAMES)
    lb.signal(signal.SIGHUP)
    wait_until(lambda: acme.load_stored(env.storage, NAMES[1]), timeout=HELPERS_START)
    # the log line follows the files by a moment
    wait_until(lambda: lb.output().count("acme: obtained a certificate for") == 2)
    assert env.pebble.orders() == 2
