"""Rate limits without an LB: the token bucket maths, the shared-memory buckets (exact under
concurrent processes, regions kept across reloads, collisions), the configuration."""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gol7lb import ratelimit
from gol7lb.config import ConfigError, load_settings
from gol7lb.ratelimit import (
    SETS,
    WAYS,
    Limiter,
    LocalStore,
    RateLimitSpec,
    SharedBuckets,
    compile_limits,
    refill_and_take,
    refusal_headers,
)

# -- maths -------------------------------------------------------------------------------------

rates = st.floats(min_value=0.001, max_value=1000)
bursts = st.integers(min_value=1, max_value=1000)


@given(rates, bursts, st.lists(st.floats(min_value=0, max_value=100), max_size=60))
def test_a_bucket_never_lets_through_more_than_burst_plus_refill(refill, burst, gaps):
    """Over any run of requests starting from a full bucket, at most burst + refill x elapsed
    get through, and the tokens stay within [0, burst]."""
    tokens, elapsed, passed = float(burst), 0.0, 0
    for gap in [0.0, *gaps]:
        elapsed += gap
        allowed, tokens = refill_and_take(tokens, gap, refill, burst)
        passed += allowed
        assert 0.0 <= tokens <= burst
        assert passed <= burst + refill * elapsed + 1e-6


@given(rates, bursts, st.integers(min_value=0, max_value=3000))
def test_requests_at_one_instant_get_exactly_burst(refill, burst, count):
    tokens, passed = float(burst), 0
    for _ in range(count):
        allowed, tokens = refill_and_take(tokens, 0.0, refill, burst)
        passed += allowed
    assert passed == min(count, burst)


@given(rates, bursts, st.floats(min_value=0, max_value=0.999))
def test_retry_after_is_when_the_next_token_is_there(refill, burst, tokens):
    headers = dict(refusal_headers(tokens, refill, burst))
    retry = int(headers["Retry-After"])
    assert retry >= 1
    assert refill_and_take(tokens, retry, refill, burst)[0]  # waiting that long is enough
    if retry > 1:  # and a second less is not (it is the smallest whole number of seconds)
        assert not refill_and_take(tokens, retry - 1 - 1e-6, refill, burst)[0]
    reset = int(headers["RateLimit-Reset"])
    assert tokens + reset * refill >= burst - 1e-6 and reset >= retry
    assert headers["RateLimit-Limit"] == str(burst) and headers["RateLimit-Remaining"] == "0"


def test_refusal_headers_for_a_plain_case():
    # rate 1 per 2 s, burst 2, just emptied: next token in 2 s, full in 4 s
    assert refusal_headers(0.0, 0.5, 2) == [("Retry-After", "2"), ("RateLimit-Limit", "2"),
                                           ("RateLimit-Remaining", "0"),
                                           ("RateLimit-Reset", "4")]


# -- shared buckets ----------------------------------------------------------------------------


def digest_in_set(set_index: int, n: int) -> bytes:
    """A 16-byte key digest with fingerprint n that hashes to `set_index`."""
    return (n + 1).to_bytes(8, "little") + set_index.to_bytes(4, "little") + bytes(4)


BURST = 3000


def _hammer(buckets: SharedBuckets, region: int, takes: int, start: Any,
            out: multiprocessing.Queue) -> None:
    passed = 0
    lock = threading.Lock()

    def run() -> None:
        nonlocal passed
        mine = 0
        for _ in range(takes):
            mine += buckets.take(region, digest_in_set(7, 1), 1e-9, BURST)[0]
        with lock:
            passed += mine

    threads = [threading.Thread(target=run) for _ in range(4)]
    start.wait(60)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(passed)


def test_concurrent_processes_and_threads_take_exactly_the_budget(tmp_path: Path):
    """4 processes x 4 threads x 300 takes at once on one key with burst 3000: exactly 3000
    (without the cross-process lock, lost updates let hundreds more through)."""
    buckets = SharedBuckets(str(tmp_path / "rl.lock"))
    region = buckets.claim([11])[11]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_hammer, args=(buckets, region, 300, start, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(results) == BURST


def test_a_killed_process_holding_a_set_lock_frees_it(tmp_path: Path):
    """The kernel drops a dead process's fcntl locks: nobody waits for it for ever."""
    buckets = SharedBuckets(str(tmp_path / "rl.lock"))
    region = buckets.claim([5])[5]
    ctx = multiprocessing.get_context("fork")
    holding = ctx.Event()

    def hold() -> None:
        buckets._locked(region * SETS + 3).__enter__()
        holding.set()
        threading.Event().wait(60)

    proc = ctx.Process(target=hold)
    proc.start()
    assert holding.wait(30)
    assert proc.pid is not None
    os.kill(proc.pid, 9)
    proc.join(10)
    assert buckets.take(region, digest_in_set(3, 1), 1.0, 1) == (True, 0.0)


def test_regions_are_kept_for_the_same_identity_and_fresh_for_a_new_one():
    buckets = SharedBuckets()
    first = buckets.claim([1, 2])
    for _ in range(3):
        buckets.take(first[2], digest_in_set(0, 1), 1e-6, 3)
    assert buckets.take(first[2], digest_in_set(0, 1), 1e-6, 3)[0] is False
    again = buckets.claim([2, 3])  # a reload: limit 1 left, 3 came
    assert again[2] == first[2]
    assert buckets.take(again[2], digest_in_set(0, 1), 1e-6, 3)[0] is False  # still spent
    assert again[3] not in (first[1], first[2])  # a free region first, not the one just left
    assert buckets.take(again[3], digest_in_set(0, 1), 1e-6, 3) == (True, 2.0)


def test_regions_are_reused_when_all_are_taken():
    buckets = SharedBuckets()
    first = {i: buckets.claim([i])[i] for i in range(1, ratelimit.REGIONS + 1)}
    assert len(set(first.values())) == ratelimit.REGIONS
    # Every region is held: a new limit takes the one idle longest (identity 1's)...
    newest = buckets.claim([9999])[9999]
    assert newest == first[1]
    assert buckets.claim([9999])[9999] == newest  # ... and keeps it
    # ... and identity 1, back again, takes the next idle one, never the one just claimed.
    assert buckets.claim([1])[1] == first[2]


def test_collisions_evict_the_fullest_bucket_first():
    buckets = SharedBuckets()
    region = buckets.claim([1])[1]
    refill, burst = 1e-6, 2
    # WAYS keys of one set: the first spends everything, the others one token each
    for n in range(WAYS):
        buckets.take(region, digest_in_set(9, n), refill, burst)
    buckets.take(region, digest_in_set(9, 0), refill, burst)
    assert buckets.take(region, digest_in_set(9, 0), refill, burst)[0] is False
    # A new key in the full set takes the slot of one with most tokens left, not key 0's
    assert buckets.take(region, digest_in_set(9, 100), refill, burst) == (True, 1.0)
    assert buckets.take(region, digest_in_set(9, 0), refill, burst)[0] is False
    # another set is not involved at all
    assert buckets.take(region, digest_in_set(10, 0), refill, burst) == (True, 1.0)


def test_a_changed_rate_applies_to_the_tokens_left():
    buckets = SharedBuckets()
    region = buckets.claim([4])[4]
    for _ in range(5):
        buckets.take(region, digest_in_set(1, 1), 1e-6, 5)
    # burst lowered to 2: the empty bucket stays empty
    assert buckets.take(region, digest_in_set(1, 1), 1e-6, 2)[0] is False


def test_limiter_keys():
    spec = RateLimitSpec("x", 1.0, key="header:X-Api-Key")
    limiter = Limiter(spec, "3", LocalStore(SharedBuckets(), 0))
    with_header = {"HTTP_X_API_KEY": "k", "REMOTE_ADDR": "10.0.0.1"}
    assert limiter.key(with_header, "/p") == b"h\0k"
    assert limiter.key({"REMOTE_ADDR": "10.0.0.1"}, "/p") == b"a\x0010.0.0.1"
    assert Limiter(RateLimitSpec("x", 1.0, key="path"), "3",
                   limiter.store).key(with_header, "/p") == b"p\0/p"
    assert Limiter(RateLimitSpec("x", 1.0, key="route"), "3",
                   limiter.store).key(with_header, "/p") == b"r\x003"


def test_compiled_limits_by_route_index_and_the_top_level(tmp_path):
    settings = load_settings({"GOL7LB_CONFIG": _write(tmp_path,
        'rate_limit = "a"\n[[backends]]\nurl = "http://127.0.0.1:9"\n'
        '[rate_limits.a]\nrate = 1\n[rate_limits.b]\nrate = 2\n'
        '[[routes]]\npath_prefix = "/x"\npool = "default"\nrate_limit = "b"\n'
        '[[routes]]\npath_prefix = "/y"\npool = "default"\n')})
    limits = compile_limits(settings.rate_limits, settings.routes, settings.rate_limit)
    by_route = limits.by_route
    assert by_route[0] is not None and by_route[0].spec.name == "b"
    assert by_route[0].route == "routes[0] path_prefix=/x"
    assert by_route[1] is None
    assert by_route[-1] is not None and by_route[-1].spec.name == "a"
    assert by_route[-1].route == "unmatched"
    again = compile_limits(settings.rate_limits, settings.routes, settings.rate_limit, limits)
    assert again is limits  # unchanged configuration: the same limiters


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "lb.toml"
    path.write_text(text)
    return str(path)


# -- configuration -----------------------------------------------------------------------------

BASE = '[[backends]]\nurl = "http://127.0.0.1:9"\n'


@pytest.mark.parametrize("text, words", [
    ("[rate_limits.a]\nper = 1\n", ["missing setting rate_limits.a.rate"]),
    ("[rate_limits.a]\nrate = 0\n", ["rate_limits.a.rate = 0", "> 0"]),
    ("[rate_limits.a]\nrate = true\n", ["rate_limits.a.rate = True"]),
    ("[rate_limits.a]\nrate = 1\nper = -1\n", ["rate_limits.a.per = -1"]),
    ("[rate_limits.a]\nrate = 1\nburst = 1.5\n", ["rate_limits.a.burst = 1.5", "whole"]),
    ("[rate_limits.a]\nrate = 1\nkey = \"cookie:x\"\n", ["rate_limits.a.key", "header:NAME"]),
    ("[rate_limits.a]\nrate = 1\nkey = \"header:\"\n", ["rate_limits.a.key"]),
    ("[rate_limits.a]\nrate = 1\nstore = \"memcached://x:1\"\n", ["rate_limits.a.store"]),
    ("[rate_limits.a]\nrate = 1\nstore = \"redis://:99999/0\"\n", ["rate_limits.a.store"]),
    ("[rate_limits.a]\nrate = 1\nstore = \"redis://h:6379/x\"\n", ["rate_limits.a.store"]),
    ("[rate_limits.a]\nrate = 1\non_store_error = \"maybe\"\n",
     ["rate_limits.a.on_store_error", "allow or deny"]),
    ("[rate_limits.a]\nrate = 1\nburts = 2\n", ["unknown setting rate_limits.a.burts"]),
    ("[rate_limits.\"a b\"]\nrate = 1\n", ["rate_limits", "'a b'"]),
    ("rate_limits = 3\n", ["rate_limits = 3"]),
    ("rate_limit = \"nope\"\n", ["rate_limit = 'nope'", "no such rate limit",
                                 "none (no [rate_limits.NAME] table)"]),
    ('[rate_limits.a]\nrate = 1\n[[routes]]\nhost = "h.example"\npath_prefix = "/api/"\n'
     'pool = "default"\nrate_limit = "b"\n',
     ["routes[0].rate_limit = 'b'", "host='h.example' path_prefix='/api/'",
      "rate limits are a"]),
    ('[[routes]]\npool = "default"\nrate_limit = 1\n', ["routes[0].rate_limit = 1"]),
])
def test_bad_rate_limits_are_refused_with_one_line(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load_settings({"GOL7LB_CONFIG": _write(tmp_path, text + "\n" + BASE)})
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_defaults_and_a_redis_store(tmp_path):
    settings = load_settings({"GOL7LB_CONFIG": _write(tmp_path,
        BASE + '[rate_limits.a]\nrate = 2.5\n[rate_limits.b]\nrate = 1\n'
        'store = "redis://:secret@127.0.0.1:6379/2"\non_store_error = "deny"\n')})
    a, b = settings.rate_limits
    assert (a.key, a.per, a.burst, a.store, a.on_store_error) == (
        "client_ip", 1.0, math.ceil(2.5), "local", "allow")
    assert b.on_store_error == "deny"
    assert b.describe()["store"] == "redis://:***@127.0.0.1:6379/2"


def test_too_many_local_limits_are_refused(tmp_path):
    text = BASE + "".join(f"[rate_limits.l{i}]\nrate = 1\n"
                          for i in range(ratelimit.MAX_LOCAL_LIMITS + 1))
    with pytest.raises(ConfigError, match="at most 64 limits"):
        load_settings({"GOL7LB_CONFIG": _write(tmp_path, text)})


@settings(max_examples=200)
@given(st.text(max_size=20))
def test_store_check_never_raises(text):
    assert ratelimit.check_store(text) in (True, False)
