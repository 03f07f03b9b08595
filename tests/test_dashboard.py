"""The admin dashboard (GET / on the admin listener) in a real headless browser.

Debian's Chromium and ChromeDriver (tests/run.sh installs them), driven by Selenium pointed
at /usr/bin/chromedriver and /usr/bin/chromium, so nothing is ever downloaded. Each test
runs a real LB in front of three real demo backends and reads the page only through its
tested interface: rows with `data-backend`/`data-state`, buttons with `data-action`,
`<body data-admin="ok|unreachable">`, the `#statusline`. Every browser process the test
started is checked gone by PID afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import FAST_HEALTH, backends_env
from tests.procs import LB, Proc, kill_pids, pid_alive

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
IN_CI = os.environ.get("CI") == "true"
WAIT = 30.0  # generous: other suites share the machine's two cores

pytestmark = pytest.mark.slow


def _require_browser() -> None:
    """Skip on a developer machine without Chromium; in CI a missing browser is a failure."""
    if not CHROMIUM.exists():
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing in CI: tests/run.sh should have installed it")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium; tests/run.sh "
                    "installs it with chromium-driver)")
    if not CHROMEDRIVER.exists():
        pytest.fail(f"{CHROMIUM} is there but {CHROMEDRIVER} is not: apt-get install "
                    "chromium-driver (tests/run.sh does)")


class Browser:
    """Headless Chromium through ChromeDriver; remembers every PID it started."""

    def __init__(self, tmp: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        # A private HOME: the profile, the caches and Chromium's crash handler (which detaches
        # from the process tree) all get paths under it, so their command lines name it.
        self.home = tmp / "chromium-home"
        self.home.mkdir()
        env = dict(os.environ, HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / ".config"),
                   XDG_CACHE_HOME=str(self.home / ".cache"))
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--window-size=1200,800", f"--user-data-dir={self.home / 'profile'}",
                    "--no-first-run", "--disable-background-networking"):
            options.add_argument(arg)
        self.service = Service(executable_path=str(CHROMEDRIVER), env=env,
                               log_output=str(tmp / "chromedriver.log"))
        self.seen: set[int] = set()
        try:
            self.driver = webdriver.Chrome(service=self.service, options=options)
        except Exception:
            self.quit()
            raise
        self.scan()

    def scan(self) -> set[int]:
        """ChromeDriver's tree, plus any process whose command line names our private HOME."""
        found: set[int] = set()
        process = getattr(self.service, "process", None)
        if process is not None:
            try:
                root = psutil.Process(process.pid)
                found |= {root.pid, *(p.pid for p in root.children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        marker = str(self.home)
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or ()
            if any(marker in arg for arg in cmdline):
                found.add(proc.pid)
        self.seen |= found
        return found

    def quit(self) -> list[int]:
        """Quit the browser; returns the PIDs still alive after a generous wait (then killed)."""
        self.scan()
        driver = getattr(self, "driver", None)
        with contextlib.suppress(Exception):
            if driver is not None:
                driver.quit()
            else:
                self.service.stop()
        deadline = time.monotonic() + 20
        while True:
            left = sorted(pid for pid in self.seen | self.scan() if pid_alive(pid))
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        kill_pids(set(left))
        return left

    # -- reading the page --------------------------------------------------------------

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.scan()  # the renderers and helpers exist now
        # A mark that only survives while the page is not reloaded.
        self.driver.execute_script("window.__gol7lbNotReloaded = true;")

    def not_reloaded(self) -> bool:
        return self.driver.execute_script("return window.__gol7lbNotReloaded === true;") is True

    def states(self) -> dict[str, str]:
        """data-backend -> data-state of every backend row, read in one round trip."""
        return self.driver.execute_script(
            "var out = {};"
            "document.querySelectorAll('[data-backend]').forEach(function (e) {"
            "  out[e.getAttribute('data-backend')] = e.getAttribute('data-state'); });"
            "return out;")

    def click(self, backend: str, action: str) -> None:
        from selenium.webdriver.common.by import By

        row = self.driver.find_element(By.CSS_SELECTOR, f'[data-backend="{backend}"]')
        row.find_element(By.CSS_SELECTOR, f'[data-action="{action}"]').click()

    def status_line(self) -> tuple[str, str]:
        return tuple(self.driver.execute_script(
            "var e = document.getElementById('statusline');"
            "return e ? [e.textContent, e.className] : ['(no status line)', ''];"))

    def until(self, what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
        """Poll `check` until it returns something true; fail with `what` and the rows."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout}s, still not: {what}; rows: {self.states()}"
                                     f"; status line: {self.status_line()}")
            time.sleep(0.1)

    def answer_prompt(self, text: str, timeout: float = WAIT) -> str:
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        alert = WebDriverWait(self.driver, timeout).until(expected_conditions.alert_is_present())
        question = alert.text
        alert.send_keys(text)
        alert.accept()
        return question

    def alert_open(self) -> bool:
        from selenium.webdriver.support import expected_conditions

        return bool(expected_conditions.alert_is_present()(self.driver))


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    _require_browser()
    try:
        import selenium  # noqa: F401
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    b = Browser(tmp_path)
    try:
        yield b
    finally:
        left = b.quit()
    assert not left, f"browser processes left running: {left}"


def _dashboard_lb(lb_factory: Callable[..., LB], backends: list[Proc], **env: str) -> LB:
    return lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in backends]),
                       **FAST_HEALTH, **env})


def _id(backend: Proc) -> str:
    return f"127.0.0.1:{backend.port}"


def _served_by(lb: LB, n: int) -> collections.Counter[int]:
    """Send n requests through the LB; count them by the port the backend names."""
    counts: collections.Counter[int] = collections.Counter()
    with requests.Session() as session:
        for _ in range(n):
            r = session.get(lb.url + "/", timeout=10)
            assert r.status_code == 200, (r.status_code, r.text)
            m = re.fullmatch(r"backend (\d+)\n", r.text)
            assert m, r.text
            counts[int(m.group(1))] += 1
    return counts


def _open_all_up(browser: Browser, lb: LB, backends: list[Proc]) -> None:
    browser.open(lb.admin_url + "/")
    want = {_id(b): "up" for b in backends}
    browser.until(f"three rows, all up: {want}", lambda: browser.states() == want)


def test_rows_appear_up_then_follow_health_and_admin_reachability(
        browser: Browser, lb_factory: Callable[..., LB], three_backends: list[Proc]) -> None:
    lb = _dashboard_lb(lb_factory, three_backends)
    _open_all_up(browser, lb, three_backends)
    assert browser.driver.execute_script("return document.body.getAttribute('data-admin')") == "ok"
    legend = browser.driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-legend]'))"
        ".map(function (e) { return e.getAttribute('data-legend'); });")
    assert sorted(legend) == sorted(_id(b) for b in three_backends)  # one chart line each

    victim, *others = three_backends
    victim.stop()
    browser.until(f"{_id(victim)} down, the others up",
                  lambda: browser.states() == {_id(victim): "down",
                                               **{_id(b): "up" for b in others}})
    assert browser.not_reloaded()

    lb.stop()
    browser.until("the page says the admin listener is unreachable", lambda: (
        browser.driver.execute_script("return document.body.getAttribute('data-admin')")
        == "unreachable"))
    banner = browser.driver.execute_script(
        "var e = document.getElementById('unreachable'); return e.hidden ? '' : e.textContent;")
    assert "unreachable" in banner.lower()
    assert browser.not_reloaded()


def test_drain_button_stops_traffic_and_enable_brings_it_back(
        browser: Browser, lb_factory: Callable[..., LB], three_backends: list[Proc]) -> None:
    lb = _dashboard_lb(lb_factory, three_backends)
    _open_all_up(browser, lb, three_backends)
    target, *others = three_backends
    assert set(_served_by(lb, 30)) == {b.port for b in three_backends}

    browser.click(_id(target), "drain")
    browser.until(f"{_id(target)} draining or drained",
                  lambda: browser.states().get(_id(target)) in ("draining", "drained"))
    counts = _served_by(lb, 30)
    assert counts[target.port] == 0, f"a drained backend still got traffic: {counts}"
    assert all(counts[b.port] > 0 for b in others), counts
    text, cls = browser.status_line()
    assert "error" not in cls.split(), text

    browser.click(_id(target), "enable")
    browser.until(f"{_id(target)} up again", lambda: browser.states().get(_id(target)) == "up")
    browser.until(f"{_id(target)} gets traffic again",
                  lambda: _served_by(lb, 15)[target.port] > 0)
    assert browser.not_reloaded()


def test_token_is_asked_once_and_sent_on_mutating_calls(
        browser: Browser, lb_factory: Callable[..., LB], three_backends: list[Proc]) -> None:
    lb = _dashboard_lb(lb_factory, three_backends, GOL7LB_ADMIN_TOKEN="secret")
    target = three_backends[0]
    refused = requests.post(f"{lb.admin_url}/backends/{_id(target)}/drain", timeout=10,
                            headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401, refused.text
    _open_all_up(browser, lb, three_backends)

    # A wrong token: the call fails, the status line shows the API's JSON error, nothing changes.
    browser.click(_id(target), "drain")
    assert "token" in browser.answer_prompt("wrong").lower()
    text, _ = browser.until("an error in the status line", lambda: (
        "error" in browser.status_line()[1].split() and browser.status_line()))
    assert refused.json()["error"] in text, text
    assert browser.states()[_id(target)] == "up"

    # The right token: the drain goes through, and the page keeps the token.
    browser.click(_id(target), "drain")
    browser.answer_prompt("secret")
    browser.until(f"{_id(target)} draining or drained",
                  lambda: browser.states().get(_id(target)) in ("draining", "drained"))
    assert _served_by(lb, 15)[target.port] == 0
    assert browser.driver.execute_script(
        "return sessionStorage.getItem('gol7lb.adminToken');") == "secret"

    # No second prompt: enable is sent with the kept token.
    browser.click(_id(target), "enable")
    browser.until(f"{_id(target)} up again", lambda: browser.states().get(_id(target)) == "up")
    assert not browser.alert_open()
    assert browser.not_reloaded()


def test_routes_show_their_rules_and_denied_counts(
        browser: Browser, lb_factory: Callable[..., LB], backend_factory: Callable[..., Proc],
        tmp_path: Path) -> None:
    backend = backend_factory()
    config = tmp_path / "lb.toml"
    config.write_text(f'[[backends]]\nurl = "http://127.0.0.1:{backend.port}"\n'
                      '[[routes]]\npath_prefix = "/private/"\npool = "default"\n'
                      'deny = ["127.0.0.0/8"]\n'
                      '[[routes]]\npath_prefix = "/ping"\nrespond = { body = "pong" }\n')
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **FAST_HEALTH})
    browser.open(lb.admin_url + "/")

    def routes() -> dict[str, list[str]]:
        return browser.driver.execute_script(
            "var out = {};"
            "document.querySelectorAll('[data-route]').forEach(function (e) {"
            "  out[e.getAttribute('data-route')] = [e.getAttribute('data-denied'),"
            "    e.getAttribute('data-rate-limited'), e.textContent]; });"
            "return out;")

    private, ping = "routes[0] path_prefix=/private/", "routes[1] path_prefix=/ping"
    browser.until("two route rows", lambda: set(routes()) == {private, ping})
    assert routes()[private][0] == "0" and "deny" in routes()[private][2]
    assert "respond 200" in routes()[ping][2]
    for _ in range(3):
        assert requests.get(lb.url + "/private/x", timeout=10).status_code == 403
    assert requests.get(lb.url + "/ping", timeout=10).text == "pong"
    browser.until("3 denied on the private route", lambda: routes()[private][0] == "3")
    assert routes()[ping][:2] == ["0", "0"]


def test_routes_show_their_rate_limited_counts(
        browser: Browser, lb_factory: Callable[..., LB], three_backends: list[Proc],
        tmp_path: Path) -> None:
    backends = "".join(f'[[backends]]\nurl = "http://127.0.0.1:{b.port}"\n'
                       for b in three_backends)
    config = tmp_path / "lb.toml"
    config.write_text(
        'rate_limit = "two"\n' + backends
        + '[[routes]]\npath_prefix = "/api/"\npool = "default"\nrate_limit = "one"\n'
        + '[[routes]]\npath_prefix = "/free/"\npool = "default"\n'
        + '[rate_limits.one]\nrate = 1\nper = 600\nburst = 1\n'
        + '[rate_limits.two]\nrate = 2\nper = 600\nburst = 2\n')
    lb = lb_factory({"GOL7LB_CONFIG": str(config), **FAST_HEALTH})
    _open_all_up(browser, lb, three_backends)

    def counts() -> dict[str, str]:
        return browser.driver.execute_script(
            "var out = {};"
            "document.querySelectorAll('[data-route]').forEach(function (e) {"
            "  out[e.getAttribute('data-route')] = e.getAttribute('data-rate-limited'); });"
            "return out;")

    api, free = "routes[0] path_prefix=/api/", "routes[1] path_prefix=/free/"
    browser.until("a row per route and one for no route, nothing limited yet",
                  lambda: counts() == {api: "0", free: "0", "unmatched": "0"})
    answers = [requests.get(lb.url + path, timeout=10).status_code
               for path in ["/api/x"] * 4 + ["/free/x"] * 3 + ["/"] * 3]
    assert answers.count(429) == 4, answers
    browser.until("3 limited on route 0, 1 without a route",
                  lambda: counts() == {api: "3", free: "0", "unmatched": "1"})
    assert browser.not_reloaded()


@pytest.mark.lean_worker  # HTTPS needs gol7lb's own worker
def test_certificates_show_their_expiry(
        browser: Browser, lb_factory: Callable[..., LB], three_backends: list[Proc],
        tmp_path: Path) -> None:
    """With HTTPS on, a table lists each served certificate's names and expiry; one with
    fewer than 14 days left is marked expiring."""
    import datetime

    import trustme

    ca = trustme.CA()
    files = {}
    for stem, name, days in (("long", "localhost", None), ("short", "short.test", 5)):
        not_after = None if days is None else \
            datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
        leaf = ca.issue_cert(name, not_after=not_after)
        cert, key = tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        files[stem] = (cert, key)
    lb = _dashboard_lb(lb_factory, three_backends, GOL7LB_TLS_CERT=str(files["long"][0]),
                       GOL7LB_TLS_KEY=str(files["long"][1]),
                       GOL7LB_TLS_CERTIFICATES=f"{files['short'][0]}:{files['short'][1]}")
    browser.open(lb.admin_url + "/")

    def rows() -> dict[str, list[str]]:
        return browser.driver.execute_script(
            "var out = {}; document.querySelectorAll('tr[data-certificate]').forEach("
            "function (r) { out[r.getAttribute('data-certificate')] = [r.getAttribute("
            "'data-expiring')].concat(Array.from(r.cells).map(function (c) {"
            " return c.textContent; })); }); return out;")

    found = browser.until("two certificate rows", lambda: len(rows()) == 2 and rows())
    long_row, short_row = found[str(files["long"][0])], found[str(files["short"][0])]
    assert long_row[:2] == ["ok", "localhost"] and long_row[2].startswith("3000-01-0")
    assert short_row[:2] == ["soon", "short.test"]
    assert "(in 4 d)" in short_row[2] or "(in 5 d)" in short_row[2]
    assert browser.driver.execute_script(
        "return document.getElementById('certificates').hidden;") is False
