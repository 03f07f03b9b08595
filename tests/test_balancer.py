"""Selection policies on their own: pure functions, no processes."""

import random
from collections import Counter

import pytest

from gol7lb.backends import Backend, parse_backend_url
from gol7lb.balancer import (
    ALGORITHMS,
    ConsistentHashPolicy,
    LeastConnectionsPolicy,
    PickContext,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_policy,
    next_peer,
    pool_sticky_secret,
    smooth_weighted_schedule,
    sticky_key,
)
from gol7lb.config import load_settings
from gol7lb.pools import Pool


def backends(*weights: int) -> list[Backend]:
    return [parse_backend_url(f"http://127.0.0.1:{9000 + i}", w) for i, w in enumerate(weights)]


def ids(bs) -> set[str]:
    return {b.id for b in bs}


def ticket(t: int, **kw) -> PickContext:
    return PickContext(ticket=t, **kw)


def loads(table: dict[str, int]):
    return lambda backend_id: table.get(backend_id, 0)


# -- every policy -------------------------------------------------------------------------------

def test_the_config_accepts_every_algorithm_the_balancer_knows():
    for algorithm in ALGORITHMS:
        assert load_settings({"GOL7LB_ALGORITHM": algorithm}).algorithm == algorithm


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nothing_available_gives_nothing_to_try(algorithm):
    bs = backends(1, 2, 3)
    assert make_policy(algorithm, bs, set()).order(PickContext(key=b"k")) == ()
    assert make_policy(algorithm, bs, set()).order(PickContext()) == ()
    assert make_policy(algorithm, [], set()).order(PickContext(key=b"k")) == ()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_order_is_the_chosen_one_then_every_other_available_backend_once(algorithm):
    bs = backends(1, 2, 3, 1, 1)
    available = {bs[0].id, bs[2].id, bs[3].id}
    policy = make_policy(algorithm, bs, available)
    rng = random.Random(7)
    for t in range(50):
        ctx = PickContext(ticket=t, key=f"key-{t}".encode(), rng=rng,
                          in_flight=loads({bs[0].id: t % 3, bs[2].id: 1}))
        order = policy.order(ctx)
        assert len(order) == 3 and ids(order) == available


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_single_available_backend_is_always_chosen(algorithm):
    bs = backends(1, 1, 1)
    policy = make_policy(algorithm, bs, {bs[1].id})
    for t in range(10):
        assert list(policy.order(PickContext(ticket=t, key=str(t).encode()))) == [bs[1]]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_uses_flags_say_what_order_reads(algorithm):
    """A policy that claims not to read the ticket or the loads gives the same answer without."""
    bs = backends(1, 1, 1)
    policy = make_policy(algorithm, bs, ids(bs))
    calls = []

    def counting(backend_id: str) -> int:
        calls.append(backend_id)
        return 0

    for t in range(6):
        order = policy.order(PickContext(ticket=t, in_flight=counting, key=b"x",
                                         rng=random.Random(t)))
        if not policy.uses_ticket:
            assert order == policy.order(PickContext(ticket=0, key=b"x", rng=random.Random(t)))
    assert bool(calls) == policy.uses_in_flight


def test_unknown_algorithm_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown balancing algorithm 'fastest'"):
        make_policy("fastest", backends(1), set())


def test_make_policy_by_name():
    bs = backends(1, 1)
    for name, cls in [("round_robin", RoundRobinPolicy), ("random", RandomPolicy),
                      ("least_connections", LeastConnectionsPolicy),
                      ("power_of_two", PowerOfTwoPolicy),
                      ("consistent_hash", ConsistentHashPolicy)]:
        assert isinstance(make_policy(name, bs, ids(bs)), cls)


def test_large_pools_rotate_by_slices():
    bs = [parse_backend_url(f"http://10.0.{i // 250}.{i % 250 + 1}:80") for i in range(300)]
    policy = make_policy("round_robin", bs, ids(bs))
    order = policy.order(ticket(299))
    assert order[0] == bs[299] and order[1] == bs[0] and len(order) == 300


# -- round robin --------------------------------------------------------------------------------

def test_round_robin_cycles_in_order_and_wraps():
    bs = backends(1, 1, 1)
    policy = RoundRobinPolicy(bs)
    assert [policy.order(ticket(t))[0] for t in range(7)] == [bs[0], bs[1], bs[2], bs[0], bs[1],
                                                               bs[2], bs[0]]


def test_round_robin_spreads_n_requests_evenly():
    bs = backends(1, 1, 1, 1)
    policy = RoundRobinPolicy(bs)
    counts = Counter(policy.order(ticket(t))[0].url for t in range(1001))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_fallback_order_is_every_other_backend_once_after_the_chosen_one():
    bs = backends(1, 1, 1)
    order = RoundRobinPolicy(bs).order(ticket(1))
    assert list(order) == [bs[1], bs[2], bs[0]]


def test_weights_are_honoured_and_interleaved():
    bs = backends(5, 1, 1)
    schedule = smooth_weighted_schedule(bs)
    assert schedule == (0, 0, 1, 0, 2, 0, 0)  # nginx's smooth WRR for 5,1,1
    counts = Counter(RoundRobinPolicy(bs).order(ticket(t))[0].url for t in range(700))
    assert counts == {bs[0].url: 500, bs[1].url: 100, bs[2].url: 100}


def test_weights_reduced_by_gcd_keep_the_cycle_short():
    assert len(smooth_weighted_schedule(backends(100, 200))) == 3


def test_round_robin_skips_unavailable_and_uses_effective_weights():
    bs = backends(1, 1, 1)
    policy = make_policy("round_robin", bs, {bs[0].id, bs[2].id}, {bs[0].id: 1, bs[2].id: 3})
    counts = Counter(policy.order(ticket(t))[0] for t in range(400))
    assert counts == {bs[0]: 100, bs[2]: 300}


# -- random -------------------------------------------------------------------------------------

class FixedDraws(random.Random):
    """A generator that returns the given values from random(), in order."""

    def __init__(self, values) -> None:
        super().__init__(0)
        self.values = iter(values)

    def random(self) -> float:
        return next(self.values)


def test_random_policy_follows_weights():
    bs = backends(3, 1)
    policy = RandomPolicy(bs)
    rng = FixedDraws([0.0, 0.5, 0.74, 0.76, 0.99])
    picks = [policy.order(PickContext(rng=rng))[0] for _ in range(5)]
    assert picks == [bs[0], bs[0], bs[0], bs[1], bs[1]]


def test_random_without_a_generator_uses_the_module_one():
    bs = backends(1, 1)
    random.seed(3)
    picks = Counter(RandomPolicy(bs).order(PickContext())[0] for _ in range(200))
    assert set(picks) == set(bs)


def test_random_survives_a_draw_that_rounds_up_to_the_total():
    bs = backends(1, 2)
    assert RandomPolicy(bs).order(PickContext(rng=FixedDraws([1.0])))[0] == bs[1]


# -- least connections --------------------------------------------------------------------------

def test_least_connections_picks_the_least_loaded():
    bs = backends(1, 1, 1)
    policy = make_policy("least_connections", bs, ids(bs))
    table = {bs[0].id: 5, bs[1].id: 2, bs[2].id: 7}
    for t in range(6):
        assert policy.order(ticket(t, in_flight=loads(table)))[0] == bs[1]


def test_least_connections_compares_load_per_unit_of_weight():
    bs = backends(1, 4)
    policy = make_policy("least_connections", bs, ids(bs))
    # 2 per weight on the first, 6/4 = 1.5 on the second: the second wins although busier.
    assert policy.order(ticket(0, in_flight=loads({bs[0].id: 2, bs[1].id: 6})))[0] == bs[1]
    assert policy.order(ticket(0, in_flight=loads({bs[0].id: 1, bs[1].id: 6})))[0] == bs[0]
    # ramped weights from the proxy override the configured ones
    ramped = make_policy("least_connections", bs, ids(bs), {bs[1].id: 1})
    assert ramped.order(ticket(0, in_flight=loads({bs[0].id: 2, bs[1].id: 6})))[0] == bs[0]


def test_least_connections_rotates_ties():
    bs = backends(1, 1, 1)
    policy = make_policy("least_connections", bs, ids(bs))
    busy = loads({bs[0].id: 3, bs[1].id: 3, bs[2].id: 3})
    assert [policy.order(ticket(t, in_flight=busy))[0] for t in range(6)] == bs + bs
    idle = PickContext().in_flight
    assert [policy.order(ticket(t, in_flight=idle))[0] for t in range(3)] == bs
    # ties among the least loaded only
    some = loads({bs[0].id: 1, bs[1].id: 4, bs[2].id: 1})
    assert [policy.order(ticket(t, in_flight=some))[0] for t in range(4)] == [bs[0], bs[2],
                                                                               bs[2], bs[0]]


def test_least_connections_idle_pool_follows_weights():
    bs = backends(3, 1)
    policy = make_policy("least_connections", bs, ids(bs))
    counts = Counter(policy.order(ticket(t))[0] for t in range(400))
    assert counts == {bs[0]: 300, bs[1]: 100}


def test_least_connections_skips_unavailable_however_idle():
    bs = backends(1, 1, 1)
    policy = make_policy("least_connections", bs, {bs[0].id, bs[1].id})
    table = loads({bs[0].id: 9, bs[1].id: 4, bs[2].id: 0})
    assert [policy.order(ticket(t, in_flight=table))[0] for t in range(3)] == [bs[1]] * 3


# -- power of two -------------------------------------------------------------------------------

def test_power_of_two_never_picks_the_more_loaded_of_its_two():
    bs = backends(1, 2, 1, 3, 1)
    table = {b.id: load for b, load in zip(bs, [4, 1, 9, 6, 0], strict=True)}
    weight = {b.id: b.weight for b in bs}
    policy = make_policy("power_of_two", bs, ids(bs))
    rng = random.Random(11)
    pairs = set()
    asked: list[str] = []

    def in_flight(backend_id: str) -> int:
        asked.append(backend_id)
        return table[backend_id]

    for _ in range(500):
        asked.clear()
        chosen = policy.order(PickContext(in_flight=in_flight, rng=rng))[0]
        assert len(asked) == 2 and asked[0] != asked[1] and chosen.id in asked
        other = asked[0] if asked[1] == chosen.id else asked[1]
        assert table[chosen.id] / weight[chosen.id] <= table[other] / weight[other]
        pairs.add(frozenset(asked))
    assert len(pairs) == 10  # every pair of the five was drawn
    heaviest = bs[2]  # 9 in flight on weight 1: never chosen
    assert all(policy.order(PickContext(in_flight=loads(table), rng=rng))[0] != heaviest
               for _ in range(200))


def test_power_of_two_with_two_backends_always_takes_the_less_loaded():
    bs = backends(1, 1)
    policy = make_policy("power_of_two", bs, ids(bs))
    table = loads({bs[0].id: 3, bs[1].id: 2})
    assert {policy.order(PickContext(in_flight=table))[0] for _ in range(50)} == {bs[1]}


def test_power_of_two_ties_go_either_way():
    bs = backends(1, 1, 1)
    policy = make_policy("power_of_two", bs, ids(bs))
    rng = random.Random(5)
    assert {policy.order(PickContext(rng=rng))[0] for _ in range(100)} == set(bs)


def test_power_of_two_second_draw_skips_the_first():
    bs = backends(1, 1, 1)
    policy = make_policy("power_of_two", bs, ids(bs))
    # first draw 0.0 -> bs[0]; second 0.0 over the other two -> bs[1]; 0.99 -> bs[2]
    table = loads({bs[0].id: 5})
    assert policy.order(PickContext(in_flight=table, rng=FixedDraws([0.0, 0.0])))[0] == bs[1]
    assert policy.order(PickContext(in_flight=table, rng=FixedDraws([0.0, 0.99])))[0] == bs[2]
    # first 0.5 -> bs[1] (busy); second 0.0 -> bs[0], 1.0 (rounded up) -> bs[2]
    table = loads({bs[1].id: 5})
    assert policy.order(PickContext(in_flight=table, rng=FixedDraws([0.5, 0.0])))[0] == bs[0]
    assert policy.order(PickContext(in_flight=table, rng=FixedDraws([0.5, 1.0])))[0] == bs[2]


# -- consistent hash ----------------------------------------------------------------------------

def test_consistent_hash_same_key_same_backend():
    bs = backends(1, 1, 1, 1)
    policy = make_policy("consistent_hash", bs, ids(bs))
    again = make_policy("consistent_hash", list(bs), ids(bs))
    for i in range(200):
        key = f"10.0.0.{i}".encode()
        first = policy.order(PickContext(key=key, ticket=i))
        assert first == policy.order(PickContext(key=key, ticket=i + 1))
        assert first == again.order(PickContext(key=key))


def test_consistent_hash_spreads_keys_over_all_backends():
    bs = backends(1, 1, 1, 1)
    policy = make_policy("consistent_hash", bs, ids(bs))
    counts = Counter(policy.order(PickContext(key=f"k{i}".encode()))[0] for i in range(4000))
    assert set(counts) == set(bs) and min(counts.values()) > 700


def test_consistent_hash_down_backend_keys_go_to_the_next_on_the_ring_and_come_back():
    bs = backends(1, 1, 1)
    everyone = make_policy("consistent_hash", bs, ids(bs))
    without = make_policy("consistent_hash", bs, ids(bs) - {bs[1].id})
    for i in range(500):
        ctx = PickContext(key=f"user-{i}".encode())
        full = everyone.order(ctx)
        if full[0] == bs[1]:
            assert without.order(ctx) == full[1:]  # the fallback was the next on the ring
        else:
            assert without.order(ctx)[0] == full[0]


def test_consistent_hash_without_a_key_rotates_by_ticket():
    bs = backends(1, 1, 1)
    policy = make_policy("consistent_hash", bs, ids(bs))
    assert [policy.order(ticket(t))[0] for t in range(4)] == [bs[0], bs[1], bs[2], bs[0]]


def test_consistent_hash_ring_does_not_depend_on_configured_order():
    bs = backends(1, 2, 1)
    forward = make_policy("consistent_hash", bs, ids(bs))
    backward = make_policy("consistent_hash", bs[::-1], ids(bs))
    for i in range(300):
        ctx = PickContext(key=str(i).encode())
        assert forward.order(ctx) == backward.order(ctx)


# -- next_peer and sticky -----------------------------------------------------------------------

def test_next_peer_skips_dead_ones_and_handles_all_down_like_the_seed():
    bs = backends(1, 1, 1)
    assert [next_peer(bs, [True, False, True], t) for t in range(4)] == [bs[0], bs[2], bs[0],
                                                                         bs[2]]
    assert next_peer(bs, [False, False, False], 0) is None
    assert next_peer([], [], 5) is None


def test_sticky_key_is_opaque_short_and_cookie_safe():
    value = sticky_key(b"secret", "default", "127.0.0.1:9000")
    assert len(value) == 22 and value.isascii()
    assert all(c.isalnum() or c in "-_" for c in value)
    assert "127" not in value and "9000" not in value
    assert value == sticky_key(b"secret", "default", "127.0.0.1:9000")
    assert value != sticky_key(b"secret", "api", "127.0.0.1:9000")


def test_pool_sticky_secret_uses_the_setting_or_the_pool_configuration():
    bs = tuple(backends(1, 1))
    pool = Pool("api", "round_robin", bs)
    assert pool_sticky_secret("s3cret", pool) == b"s3cret"
    derived = pool_sticky_secret("", pool)
    assert derived == pool_sticky_secret("", Pool("api", "round_robin", bs[::-1]))
    assert derived != pool_sticky_secret("", Pool("web", "round_robin", bs))
    assert derived != pool_sticky_secret("", Pool("api", "random", bs))
    assert derived != pool_sticky_secret("", Pool("api", "round_robin", bs[:1]))
    assert len(derived) == 32 and b"127.0.0.1" not in derived
