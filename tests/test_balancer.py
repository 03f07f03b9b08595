"""Selection policies on their own: pure functions, no processes."""

from collections import Counter

import pytest

from gol7lb.backends import parse_backend_url
from gol7lb.balancer import (
    RandomPolicy,
    RoundRobinPolicy,
    make_policy,
    next_peer,
    smooth_weighted_schedule,
)


def backends(*weights: int):
    return [parse_backend_url(f"http://127.0.0.1:{9000 + i}", w) for i, w in enumerate(weights)]


def test_round_robin_cycles_in_order_and_wraps():
    bs = backends(1, 1, 1)
    policy = RoundRobinPolicy(bs)
    assert [policy.order(t)[0] for t in range(7)] == [bs[0], bs[1], bs[2], bs[0], bs[1], bs[2],
                                                       bs[0]]


def test_round_robin_spreads_n_requests_evenly():
    bs = backends(1, 1, 1, 1)
    policy = RoundRobinPolicy(bs)
    counts = Counter(policy.order(t)[0].url for t in range(1001))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_fallback_order_is_every_other_backend_once_after_the_chosen_one():
    bs = backends(1, 1, 1)
    order = RoundRobinPolicy(bs).order(1)
    assert list(order) == [bs[1], bs[2], bs[0]]


def test_weights_are_honoured_and_interleaved():
    bs = backends(5, 1, 1)
    schedule = smooth_weighted_schedule(bs)
    assert schedule == (0, 0, 1, 0, 2, 0, 0)  # nginx's smooth WRR for 5,1,1
    counts = Counter(RoundRobinPolicy(bs).order(t)[0].url for t in range(700))
    assert counts == {bs[0].url: 500, bs[1].url: 100, bs[2].url: 100}


def test_weights_reduced_by_gcd_keep_the_cycle_short():
    assert len(smooth_weighted_schedule(backends(100, 200))) == 3


@pytest.mark.parametrize("policy_class", [RoundRobinPolicy, RandomPolicy])
def test_empty_healthy_list_gives_nothing_to_try(policy_class):
    assert list(policy_class([]).order(0)) == []


def test_random_policy_follows_weights():
    bs = backends(3, 1)
    values = iter([0.0, 0.5, 0.74, 0.76, 0.99])
    policy = RandomPolicy(bs, rng=lambda: next(values))
    picks = [policy.order(0)[0] for _ in range(5)]
    assert picks == [bs[0], bs[0], bs[0], bs[1], bs[1]]


def test_make_policy_by_name():
    bs = backends(1, 1)
    assert isinstance(make_policy("round_robin", bs), RoundRobinPolicy)
    assert isinstance(make_policy("random", bs), RandomPolicy)


def test_next_peer_skips_dead_ones_and_handles_all_down_like_the_seed():
    bs = backends(1, 1, 1)
    assert [next_peer(bs, [True, False, True], t) for t in range(4)] == [bs[0], bs[2], bs[0],
                                                                         bs[2]]
    assert next_peer(bs, [False, False, False], 0) is None
    assert next_peer([], [], 5) is None
