"""Properties of the selection policies over generated pools (hypothesis).

Every random draw is seeded, so a failure is a real counterexample, not bad luck; the
statistical bounds are 5 standard deviations wide.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gol7lb.backends import Backend, parse_backend_url
from gol7lb.balancer import PickContext, make_policy, sticky_key
from tests.procs import ROOT

# Other suites share this machine's two cores: no per-example deadline, few slow examples.
few = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])

weights_lists = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8)


def pool(weights: Sequence[int], base: int = 20000) -> list[Backend]:
    return [parse_backend_url(f"http://10.1.{i // 200}.{i % 200 + 1}:{base + i}", w)
            for i, w in enumerate(weights)]


def ids(backends: Sequence[Backend]) -> set[str]:
    return {b.id for b in backends}


def keys(count: int, salt: str = "") -> list[bytes]:
    return [f"{salt}client-{i}".encode() for i in range(count)]


def five_sigma(picks: int, p: float) -> float:
    return 5 * math.sqrt(picks * p * (1 - p)) + 1


# -- round robin --------------------------------------------------------------------------------

@few
@given(weights=weights_lists, start=st.integers(min_value=0, max_value=10**9),
       count=st.integers(min_value=1, max_value=600))
def test_round_robin_gives_each_its_weighted_share_in_any_window(weights, start, count):
    backends = pool(weights)
    policy = make_policy("round_robin", backends, ids(backends))
    picks = Counter(policy.order(PickContext(ticket=t))[0] for t in range(start, start + count))
    total = sum(weights)
    cycle = total // math.gcd(*weights)
    for backend, weight in zip(backends, weights, strict=True):
        share = count * weight / total
        assert abs(picks[backend] - share) < 2  # smooth WRR: measured worst case is 1.7
        if count % cycle == 0:
            assert picks[backend] == share  # whole cycles are exact
        if len(set(weights)) == 1:
            assert abs(picks[backend] - share) < 1  # equal weights: N/k plus or minus one


@few
@given(n=st.integers(min_value=1, max_value=9), start=st.integers(min_value=0, max_value=10**6),
       down=st.sets(st.integers(min_value=0, max_value=8)))
def test_round_robin_over_equal_weights_is_n_over_k_plus_or_minus_one(n, start, down):
    backends = pool([1] * n)
    available = {b.id for i, b in enumerate(backends) if i not in down}
    policy = make_policy("round_robin", backends, available)
    picks = Counter(policy.order(PickContext(ticket=t))[0].id
                    for t in range(start, start + 1000) if available)
    assert set(picks) == available
    if available:
        assert max(picks.values()) - min(picks.values()) <= 1


# -- random and power of two --------------------------------------------------------------------

@few
@given(weights=weights_lists.filter(lambda w: len(w) >= 2),
       algorithm=st.sampled_from(["random", "power_of_two"]))
def test_idle_random_choices_follow_the_weights(weights, algorithm):
    """power_of_two draws its two by weight and keeps the first on a tie: an idle pool is
    served like weighted random."""
    backends = pool(weights)
    policy = make_policy(algorithm, backends, ids(backends))
    rng = random.Random(20260)
    draws = 6000
    picks = Counter(policy.order(PickContext(rng=rng))[0] for _ in range(draws))
    total = sum(weights)
    for backend, weight in zip(backends, weights, strict=True):
        p = weight / total
        assert abs(picks[backend] - draws * p) <= five_sigma(draws, p)


@few
@given(n=st.integers(min_value=2, max_value=7), seed=st.integers(min_value=0, max_value=2**32))
def test_power_of_two_share_by_load_rank(n, seed):
    """Equal weights, distinct loads: the pair is uniform, so the k-th least loaded of n wins
    with probability (n-1-k) / C(n, 2), and the most loaded never does."""
    backends = pool([1] * n)
    shuffled = list(backends)
    random.Random(seed).shuffle(shuffled)
    load = {b.id: rank * 3 for rank, b in enumerate(shuffled)}
    policy = make_policy("power_of_two", backends, ids(backends))
    rng = random.Random(seed)
    draws = 6000
    picks = Counter(policy.order(PickContext(rng=rng, in_flight=load.__getitem__))[0]
                    for _ in range(draws))
    pairs = n * (n - 1) / 2
    for rank, backend in enumerate(shuffled):
        p = (n - 1 - rank) / pairs
        assert abs(picks[backend] - draws * p) <= five_sigma(draws, p)
    assert picks[shuffled[-1]] == 0


@few
@given(weights=weights_lists.filter(lambda w: len(w) >= 2),
       loads=st.lists(st.integers(min_value=0, max_value=50), min_size=8, max_size=8),
       ticket=st.integers(min_value=0, max_value=10**6))
def test_least_connections_choice_has_the_least_load_per_weight(weights, loads, ticket):
    backends = pool(weights)
    load = {b.id: loads[i] for i, b in enumerate(backends)}
    policy = make_policy("least_connections", backends, ids(backends))
    chosen = policy.order(PickContext(ticket=ticket, in_flight=load.__getitem__))[0]
    best = min(load[b.id] / b.weight for b in backends)
    assert math.isclose(load[chosen.id] / chosen.weight, best)


# -- consistent hash ----------------------------------------------------------------------------

RING_KEYS = keys(4000)


def owners(policy, sample: Sequence[bytes] = RING_KEYS) -> list[str]:
    return [policy.order(PickContext(key=key))[0].id for key in sample]


def test_consistent_hash_is_the_same_in_a_fresh_process_with_another_hash_seed():
    backends = pool([1, 2, 3, 1])
    here = owners(make_policy("consistent_hash", backends, ids(backends)), RING_KEYS[:500])
    script = (
        "import json\n"
        "from gol7lb.backends import parse_backend_url\n"
        "from gol7lb.balancer import PickContext, make_policy\n"
        f"bs = [parse_backend_url(u, w) for u, w in {[(b.url, b.weight) for b in backends]!r}]\n"
        "policy = make_policy('consistent_hash', bs, {b.id for b in bs})\n"
        "print(json.dumps([policy.order(PickContext(key=f'client-{i}'.encode()))[0].id\n"
        "                  for i in range(500)]))\n"
    )
    for hash_seed in ("1", "4242"):
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed},
                             timeout=60)
        assert json.loads(out.stdout) == here


@few
@given(weights=st.lists(st.integers(min_value=1, max_value=4), min_size=3, max_size=10),
       removed=st.integers(min_value=0, max_value=9), base=st.integers(1024, 60000))
def test_removing_one_backend_moves_only_its_keys_about_one_nth(weights, removed, base):
    assume(removed < len(weights))
    backends = pool(weights, base)
    before = owners(make_policy("consistent_hash", backends, ids(backends)))
    rest = backends[:removed] + backends[removed + 1:]
    after = owners(make_policy("consistent_hash", rest, ids(rest)))
    gone = backends[removed].id
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert all(before[i] == gone for i in moved)  # only its keys moved...
    assert len(moved) == before.count(gone)  # ...and all of them
    expected = len(RING_KEYS) * weights[removed] / sum(weights)
    assert 0.6 * expected <= len(moved) <= 1.5 * expected


@few
@given(n=st.integers(min_value=2, max_value=8), down=st.integers(min_value=0, max_value=7),
       base=st.integers(1024, 60000))
def test_a_down_backends_keys_all_move_and_all_come_back(n, down, base):
    assume(down < n)
    backends = pool([1] * n, base)
    everyone = ids(backends)
    gone = backends[down].id
    before = owners(make_policy("consistent_hash", backends, everyone))
    during = owners(make_policy("consistent_hash", backends, everyone - {gone}))
    after = owners(make_policy("consistent_hash", backends, everyone))
    assert gone not in during
    assert all((b == d) == (b != gone) for b, d in zip(before, during, strict=True))
    assert after == before


@few
@given(weights=st.lists(st.integers(min_value=1, max_value=5), min_size=2, max_size=6),
       base=st.integers(1024, 60000))
def test_weights_skew_consistent_hash_shares_roughly_proportionally(weights, base):
    backends = pool(weights, base)
    sample = keys(12000, salt="w")
    share = Counter(owners(make_policy("consistent_hash", backends, ids(backends)), sample))
    total = sum(weights)
    for backend, weight in zip(backends, weights, strict=True):
        expected = len(sample) * weight / total
        assert 0.6 * expected <= share[backend.id] <= 1.45 * expected


@few
@given(weights=st.lists(st.integers(min_value=1, max_value=3), min_size=2, max_size=6),
       ramped=st.integers(min_value=0, max_value=5))
def test_ramping_one_weight_only_moves_keys_to_or_from_that_backend(weights, ramped):
    assume(ramped < len(weights))
    backends = pool(weights)
    full = owners(make_policy("consistent_hash", backends, ids(backends)))
    ramp = backends[ramped].id
    low = owners(make_policy("consistent_hash", backends, ids(backends), {ramp: 1}))
    assert all(a == b or ramp in (a, b) for a, b in zip(full, low, strict=True))


# -- sticky cookie values -----------------------------------------------------------------------

hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.from_regex(r"[a-z][a-z0-9-]{5,20}(\.[a-z]{2,10}){0,2}", fullmatch=True),
)
backend_ids = st.builds(lambda h, p: f"{h}:{p}", hosts, st.integers(min_value=1, max_value=65535))
secrets = st.binary(min_size=1, max_size=64)
pool_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
URLSAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@settings(deadline=None, max_examples=200)
@given(secret=secrets, name=pool_names, backend_id=backend_ids, other=backend_ids,
       other_secret=secrets)
def test_sticky_key_is_stable_keyed_and_opaque(secret, name, backend_id, other, other_secret):
    value = sticky_key(secret, name, backend_id)
    assert value == sticky_key(secret, name, backend_id)  # stable
    assert 16 <= len(value) <= 22 and set(value) <= URLSAFE  # a plain cookie value
    if other != backend_id:
        assert sticky_key(secret, name, other) != value
    if other_secret.rstrip(b"\0") != secret.rstrip(b"\0"):  # HMAC pads keys with zeros
        assert sticky_key(other_secret, name, backend_id) != value
    # Nothing of the address: the value is only a prefix of the keyed hash...
    mac = hmac.new(secret, f"{name}\0{backend_id}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(mac).decode().startswith(value)
    # ...so the address never shows (':' '.' '[' are not even in its alphabet).
    host, _, port = backend_id.rpartition(":")
    assert backend_id not in value and host not in value
    if len(port) >= 5:
        assert port not in value  # shorter digit runs may occur by chance in any random text
