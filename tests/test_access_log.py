"""The access log of a real LB: one line per proxied request on its standard output, text or
JSON, with client, method, path, status, bytes, pool, backend, times and request id."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import time

import pytest
import requests

from tests.conftest import FAST_HEALTH, backends_env
from tests.procs import HELPERS_START, kill_once_checked, wait_until, workers_of

# 2026-11-30T15:19:54+00:00 127.0.0.1 "GET /" 200 14 pool=default backend=127.0.0.1:4607
# upstream=7.78ms total=8.352ms attempts=1 flags=- proto=HTTP/1.1 rid=d44e...
TEXT_LINE = re.compile(
    r'^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d) (?P<client>\S+) '
    r'"(?P<method>[A-Z]+) (?P<path>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+) '
    r"pool=(?P<pool>\S+) backend=(?P<backend>\S+) upstream=(?P<upstream>-|[\d.]+ms) "
    r"total=(?P<total>[\d.]+)ms attempts=(?P<attempts>\d+) flags=(?P<flags>\S+) "
    r"proto=(?P<proto>HTTP/[\d.]+) rid=(?P<rid>.+)$")
JSON_KEYS = {"time", "client", "method", "path", "status", "bytes", "pool", "backend",
             "upstream_ms", "duration_ms", "request_id", "attempts", "flags", "protocol"}





def lines(lb) -> list[str]:
    """The LB's output, one entry per line: split on newlines only (str.splitlines would
    also split on the characters a log line must not contain, hiding the bug)."""
    return [line for line in lb.output().split("\n") if line.strip()]


def text_lines_for(lb, rid: str) -> list[re.Match]:
    return [m for m in (TEXT_LINE.match(line) for line in lines(lb))
            if m and m["rid"] == rid]


def json_lines_for(lb, rid: str) -> list[dict]:
    found = []
    for line in lines(lb):
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("request_id") == rid:
                found.append(entry)
    return found


def one_line(finder, lb, rid: str):
    """The single access line of a request (the write may land just after the response)."""
    found = wait_until(lambda: finder(lb, rid), timeout=30)
    time.sleep(0.2)  # a duplicate would be written right after the first
    found = finder(lb, rid)
    assert len(found) == 1, f"expected one access line for {rid}, got {found}"
    return found[0]


def raw_get(lb, target: bytes) -> tuple[int, dict[str, str], bytes]:
    """A request sent byte for byte (requests would percent-encode the target)."""
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (f.partition(":") for f in fields)}
    return int(status_line.split()[1]), headers, body


def worker_pid(lb) -> int:
    """One of the LB's gunicorn workers (its forked children; the helpers are spawned)."""
    workers = workers_of(lb)
    assert workers, "no worker found"
    return workers[0].pid


def unescape(path: str) -> str:
    return path.encode("latin-1").decode("unicode_escape")


@pytest.fixture
def text_lb(lb_factory, three_backends):
    return lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                       **FAST_HEALTH})


@pytest.fixture
def json_lb(lb_factory, three_backends):
    return lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                       "GOL7LB_LOG_FORMAT": "json", **FAST_HEALTH})


def test_text_line_per_request_has_every_field(text_lb):
    lb = text_lb
    before = sum(1 for line in lines(lb) if TEXT_LINE.match(line))
    sent = []
    for i in range(6):
        answer = requests.get(f"{lb.url}/?n={i}", headers={"Connection": "close"}, timeout=10)
        assert answer.status_code == 200
        sent.append(answer)
    mine = requests.get(lb.url + "/bytes/12345", headers={"X-Request-ID": "my-id-42"},
                        timeout=10)
    assert mine.headers["X-Request-ID"] == "my-id-42" and len(mine.content) == 12345
    sent.append(mine)

    for i, answer in enumerate(sent):
        rid = answer.headers["X-Request-ID"]
        line = one_line(text_lines_for, lb, rid)
        assert line["client"] == "127.0.0.1"
        assert line["method"] == "GET"
        assert line["path"] == (f"/?n={i}" if i < 6 else "/bytes/12345")
        assert int(line["status"]) == 200
        assert int(line["bytes"]) == len(answer.content)
        assert line["pool"] == "default"
        assert line["backend"] == f"127.0.0.1:{answer.headers['X-Backend-Port']}"
        upstream = float(line["upstream"].removesuffix("ms"))
        assert 0 < upstream <= float(line["total"])
        assert (line["attempts"], line["flags"]) == ("1", "-")
    # nothing else was logged as an access line for these requests
    assert sum(1 for line in lines(lb) if TEXT_LINE.match(line)) == before + len(sent)


def test_lb_made_503_is_logged_with_no_backend(lb_factory, backend_factory):
    only = backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([only.port]), **FAST_HEALTH})
    only.stop()
    wait_until(lambda: requests.get(lb.admin_url + "/status", timeout=5)
               .json()["backends"][0]["alive"] is False, timeout=HELPERS_START)
    answer = requests.get(lb.url + "/gone", timeout=10)
    assert answer.status_code == 503
    line = one_line(text_lines_for, lb, answer.headers["X-Request-ID"])
    assert (line["path"], line["status"], line["backend"], line["upstream"]) == (
        "/gone", "503", "-", "-")
    assert line["pool"] == "default" and int(line["bytes"]) == len(answer.content)
    assert (line["attempts"], line["flags"]) == ("0", "UH")  # no healthy upstream


def test_json_access_and_error_lines_are_all_json_objects(json_lb):
    lb = json_lb
    answers = [requests.get(lb.url + "/", headers={"Connection": "close"}, timeout=10)
               for _ in range(3)]
    big = requests.get(lb.url + "/bytes/12345", timeout=10)
    answers.append(big)
    assert [a.status_code for a in answers] == [200] * 4
    for answer in answers:
        entry = one_line(json_lines_for, lb, answer.headers["X-Request-ID"])
        assert set(entry) >= JSON_KEYS, entry
        assert entry["client"] == "127.0.0.1" and entry["method"] == "GET"
        assert entry["status"] == 200 and entry["pool"] == "default"
        assert entry["backend"] == f"127.0.0.1:{answer.headers['X-Backend-Port']}"
        assert entry["bytes"] == len(answer.content)
        assert 0 < entry["upstream_ms"] <= entry["duration_ms"]
        assert (entry["attempts"], entry["flags"]) == (1, "-")
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", entry["time"])
    assert json_lines_for(lb, big.headers["X-Request-ID"])[0]["bytes"] == 12345
    assert json_lines_for(lb, big.headers["X-Request-ID"])[0]["path"] == "/bytes/12345"
    # The error log too: gunicorn's own lines and every helper's, from the very first line.
    wait_until(lambda: "supervisor started" in lb.output(), timeout=HELPERS_START)
    entries = []
    for line in lines(lb):
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    messages = [e.get("message", "") for e in entries]
    for expected in ("Starting gunicorn", "Booting worker", "started supervisor",
                     "supervisor started", "manager serving shared state"):
        assert any(expected in m for m in messages), f"no JSON line with {expected!r}"
    assert all({"time", "level", "pid", "message"} <= set(e) for e in entries
               if "message" in e)


def test_access_log_off_writes_no_access_line(lb_factory, three_backends):
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                     "GOL7LB_LOG_ACCESS": "false", **FAST_HEALTH})
    rids = [requests.get(lb.url + "/", timeout=10).headers["X-Request-ID"] for _ in range(5)]
    time.sleep(0.5)  # a line would be written as the response ends; give a late one a chance
    output = lb.output()
    assert not any(rid in output for rid in rids)
    assert not any(TEXT_LINE.match(line) for line in lines(lb))
    assert "Booting worker" in output  # the error log is still there


ODD_PATHS = [b'/a"b', b"/a\\", b'/a\\"b', b"/a|{}^`b", b"/a'b?q=\"x\"&r=\\", b"/%00%0a%22"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_odd_paths_give_one_parseable_line(lb_factory, three_backends, fmt):
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                     "GOL7LB_LOG_FORMAT": fmt, **FAST_HEALTH})
    for target in ODD_PATHS:
        status, headers, _ = raw_get(lb, target)
        # the demo backend answered (it knows no such path), or the LB refused an ambiguous
        # path (a backslash or an encoded NUL in the path, not in the query: 400)
        expected = 400 if b"\\" in target.partition(b"?")[0] or b"%00" in target else 404
        assert status == expected, target
        rid = headers["x-request-id"]
        if fmt == "json":
            entry = one_line(json_lines_for, lb, rid)
            assert entry["path"] == target.decode("latin-1")
            assert entry["status"] == expected
        else:
            line = one_line(text_lines_for, lb, rid)
            assert unescape(line["path"]) == target.decode("latin-1")
            assert line["status"] == str(expected)
    if fmt == "json":
        for line in lines(lb):
            json.loads(line)  # and nothing else broke a line
    # A long path of characters that escaping doubles: still one line, short enough for one
    # atomic write to a pipe shared by every worker (PIPE_BUF), with the path cut.
    status, headers, _ = raw_get(lb, b"/" + b'"\\' * 2000)
    assert status == 400  # a backslash in the path
    rid = headers["x-request-id"]
    finder = json_lines_for if fmt == "json" else text_lines_for
    one_line(finder, lb, rid)
    line = next(x for x in lines(lb) if rid in x)
    assert len(line.encode()) + 1 <= select.PIPE_BUF
    assert '..."' in line  # the cut path's mark, just before the closing quote



def test_reload_switches_the_format_and_turns_the_access_log_off(lb_factory, three_backends,
                                                                  tmp_path):
    config = tmp_path / "gol7lb.toml"
    staged = tmp_path / "gol7lb.toml.new"
    config.write_text('[log]\nformat = "text"\n')
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([b.port for b in three_backends]),
                     "GOL7LB_CONFIG": str(config), **FAST_HEALTH})
    wait_until(lambda: "config watcher on" in lb.output(), timeout=HELPERS_START)
    one_line(text_lines_for, lb, requests.get(lb.url + "/", timeout=10).headers["X-Request-ID"])
    reloaded = '"message": "reload (gol7lb.toml changed)'

    staged.write_text('[log]\nformat = "json"\n')
    staged.replace(config)  # as editors save: write, then rename
    wait_until(lambda: reloaded in lb.output(), timeout=HELPERS_START)
    after_switch = len(lb.output())
    # fresh connections, so both workers serve some: each must log JSON now
    rids = [requests.get(lb.url + "/", headers={"Connection": "close"}, timeout=10)
            .headers["X-Request-ID"] for _ in range(20)]
    wait_until(lambda: all(json_lines_for(lb, rid) for rid in rids), timeout=HELPERS_START)
    time.sleep(0.2)  # a duplicate would be written right after the first
    for rid in rids:
        found = json_lines_for(lb, rid)
        assert len(found) == 1 and set(found[0]) >= JSON_KEYS, found
    for line in lb.output()[after_switch:].split("\n"):
        if line.strip():
            json.loads(line)  # nothing of the workers and helpers is text any more
    # The master too, though only the config watcher saw the change (it follows the shared
    # generation, so give it a moment): make it log by killing workers.
    master_json = f'"pid": {lb.pid}, "logger": "gunicorn.error", "message": "Worker (pid:'
    for _ in range(10):
        booted = lb.output().count("Booting worker")
        os.kill(worker_pid(lb), signal.SIGKILL)
        wait_until(lambda b=booted: lb.output().count("Booting worker") > b, timeout=HELPERS_START)
        if master_json in lb.output():
            break
    assert master_json in lb.output(), "the master still logs text after the switch"
    for line in lb.output().split(master_json, 1)[1].split("\n")[1:]:
        if line.strip():
            json.loads(line)

    staged.write_text('[log]\nformat = "json"\naccess = false\n')
    staged.replace(config)
    wait_until(lambda: lb.output().count(reloaded) == 2, timeout=HELPERS_START)
    quiet = [requests.get(lb.url + "/", headers={"Connection": "close"}, timeout=10)
             .headers["X-Request-ID"] for _ in range(10)]
    time.sleep(0.5)  # a line would be written as the response ends; give a late one a chance
    assert not any(rid in lb.output() for rid in quiet)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_retried_request_says_how_many_attempts_and_why(lb_factory, backend_factory, fmt):
    live, doomed = backend_factory(), backend_factory()
    lb = lb_factory({"GOL7LB_BACKENDS": backends_env([doomed.port, live.port]),
                     "GOL7LB_HEALTH_INTERVAL": "60", "GOL7LB_LOG_FORMAT": fmt})
    kill_once_checked(lb, doomed)
    answers = [requests.get(lb.url + "/", timeout=10) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    found = set()
    for answer in answers:
        rid = answer.headers["X-Request-ID"]
        if fmt == "json":
            entry = one_line(json_lines_for, lb, rid)
            found.add((entry["attempts"], entry["flags"], entry["backend"]))
        else:
            line = one_line(text_lines_for, lb, rid)
            found.add((int(line["attempts"]), line["flags"], line["backend"]))
    # the dead one's turns: its connect failed (UF) and the request was retried (URX)
    assert (2, "UF,URX", f"127.0.0.1:{live.port}") in found
    assert found <= {(1, "-", f"127.0.0.1:{live.port}"),
                     (2, "UF,URX", f"127.0.0.1:{live.port}")}, found
