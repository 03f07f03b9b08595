"""Per-request CPU cost of routing and of each selection policy, measured on the real code.

Run: python benchmarks/routing_cost.py [--routes 20] [--backends 10]

What a request pays in the proxy for (a) matching the routes of a configuration with N routes
(the request matching the LAST route, the worst case), and (b) one pick by each policy,
including building its PickContext. Compare with the whole per-request CPU of the LB in the
benchmark report (`benchmarks/run.py`, "CPU us per request"); docs/performance.md has the
figures.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from gol7lb.backends import parse_backend_url
from gol7lb.balancer import ALGORITHMS, PickContext, make_policy
from gol7lb.pools import Route
from gol7lb.routing import Router


def per_call(fn: Callable[[], object], seconds: float = 0.5) -> float:
    """Microseconds per call, best of three timed batches."""
    batch = 1000
    best = float("inf")
    for _ in range(3):
        count = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(batch):
                fn()
            count += batch
        best = min(best, (time.perf_counter() - started) / count * 1e6)
    return best


def routing_cost(n_routes: int) -> tuple[float, float, float]:
    """(by host, by path, none): the request matches the last route; "by path" routes have
    no host, so every one of them is checked in turn (the worst case)."""
    environ = {"HTTP_HOST": "www.example.com", "HTTP_X_TENANT": "none"}
    hosted = [Route(pool="api", host=f"svc{i}.example.com", path_prefix=f"/v{i}/",
                    methods=frozenset({"GET", "POST"}), headers=(("x-tenant", str(i)),))
              for i in range(n_routes - 1)]
    hosted.append(Route(pool="api", host="*.example.com", path_prefix="/last/"))
    by_host = Router(hosted, ["default", "api"])
    paths = [Route(pool="api", path_prefix=f"/v{i}/", methods=frozenset({"GET", "POST"}),
                   headers=(("x-tenant", str(i)),)) for i in range(n_routes - 1)]
    paths.append(Route(pool="api", path_prefix="/last/"))
    by_path = Router(paths, ["default", "api"])
    no_routes = Router([], ["default"])
    return (per_call(lambda: by_host.match(environ, "/last/x", "GET", "www.example.com")),
            per_call(lambda: by_path.match(environ, "/last/x", "GET", "www.example.com")),
            per_call(lambda: no_routes.match(environ, "/last/x", "GET", "www.example.com")))


def policy_costs(n_backends: int) -> dict[str, float]:
    backends = [parse_backend_url(f"http://10.0.0.{i + 1}:8080", weight=1 + i % 3)
                for i in range(n_backends)]
    available = {b.id for b in backends}
    loads = {b.id: random.randrange(0, 8) for b in backends}
    counter = iter(range(10**12))
    costs = {}
    for algorithm in ALGORITHMS:
        policy = make_policy(algorithm, backends, available)

        def pick(policy=policy) -> object:
            ctx = PickContext(next(counter) if policy.uses_ticket else 0, loads.__getitem__,
                              b"10.1.2.3")
            return policy.order(ctx)[0]

        costs[algorithm] = per_call(pick)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=20)
    parser.add_argument("--backends", type=int, default=10)
    args = parser.parse_args()
    by_host, by_path, none = routing_cost(args.routes)
    print(f"routing, {args.routes} routes, matching the last one: {by_host:.2f} us per request "
          f"with host routes, {by_path:.2f} us with path-only routes (no routes: {none:.2f} us)")
    for algorithm, cost in policy_costs(args.backends).items():
        print(f"policy {algorithm:<18} {args.backends} backends: {cost:.2f} us per pick")


if __name__ == "__main__":
    main()
