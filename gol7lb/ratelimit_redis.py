"""The Redis store of rate limits (`store = "redis://host:port/db"`): one bucket per key
shared by every instance that names the same server.

One take is one atomic Lua script on the server (EVALSHA; the library loads it again after
a server restart): it reads the bucket, refills it by the server's own clock (`TIME`, so the
instances' clocks do not matter), takes a token if there is one and writes it back with an
expiry (a bucket left alone until it is full again is the same as no bucket).

The call runs in the request's pool thread, never on the worker's event loop, with short
socket timeouts. While the server cannot be reached the limit's `on_store_error` decides;
the outage is logged once per worker when it starts and once when it ends, and the LB tries
the server again only after a back-off (0.5 s, doubling up to 5 s), one request at a time,
so an outage costs the other requests nothing and Redis is not hammered when it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gol7lb.ratelimit import RateLimitSpec, StoreDown, safe_url

log = logging.getLogger("gol7lb.ratelimit")

TIMEOUT_SECONDS = 0.25  # connect and reply bound of one take
BACKOFF_SECONDS = 0.5  # first wait before trying a server that failed again
BACKOFF_MAX_SECONDS = 5.0
KEY_PREFIX = "gol7lb:rl:"

# KEYS[1]: the bucket (a hash: t = tokens, s = when, server seconds); ARGV: tokens per second,
# burst. Returns {1 or 0 (took a token), tokens left as a string}.
TAKE_SCRIPT = """
local refill = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
else
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * refill)
end
local took = 0
if tokens >= 1 then
  tokens = tokens - 1
  took = 1
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%.6f', now))
local ttl = math.min(math.ceil((burst - tokens) / refill * 1000) + 1000, 9007199254740991)
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl))
return {took, string.format('%.17g', tokens)}
"""


class RedisStore:
    """One Redis server's buckets, for one worker process (its client is made there, after
    the fork, on first use; its connection pool serves the worker's threads)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: redis.Redis | None = None
        self._script: Any = None
        self._state = threading.Lock()  # guards the outage bookkeeping below
        self._probe = threading.Lock()  # held by the one request that tries a failed server
        self._failing = False
        self._retry_at = 0.0
        self._backoff = 0.0

    def _connect(self) -> Any:
        with self._state:
            if self._script is None:
                self._client = redis.Redis.from_url(
                    self.url, socket_timeout=TIMEOUT_SECONDS,
                    socket_connect_timeout=TIMEOUT_SECONDS, retry=Retry(NoBackoff(), 0),
                    health_check_interval=0)
                self._script = self._client.register_script(TAKE_SCRIPT)
            return self._script

    def take(self, spec: RateLimitSpec, digest: bytes) -> tuple[bool, float]:
        if not self._failing:
            return self._take(spec, digest, False)
        if time.monotonic() < self._retry_at or not self._probe.acquire(blocking=False):
            raise StoreDown
        try:
            return self._take(spec, digest, True)
        finally:
            self._probe.release()

    def _take(self, spec: RateLimitSpec, digest: bytes, probe: bool) -> tuple[bool, float]:
        key = f"{KEY_PREFIX}{spec.name}:{digest.hex()}"
        try:
            script = self._script or self._connect()
            took, tokens = script(keys=[key], args=[repr(spec.refill), spec.burst])
            result = bool(took), float(tokens)
        except (redis.RedisError, OSError, ValueError) as e:
            self._failed(e, probe)
            raise StoreDown from None
        if self._failing:
            self._recovered()
        return result

    def _failed(self, error: BaseException, probe: bool) -> None:
        """The first failure starts the outage; a failed probe doubles the back-off; requests
        that were already under way when the outage began change nothing."""
        with self._state:
            if self._failing and not probe:
                return
            self._backoff = min(BACKOFF_MAX_SECONDS, 2 * self._backoff) if self._failing \
                else BACKOFF_SECONDS
            self._retry_at = time.monotonic() + self._backoff
            if self._failing:
                return
            self._failing = True
        log.error("rate limit store %s unreachable (%s); on_store_error decides until it is "
                  "back", safe_url(self.url), error or type(error).__name__)

    def _recovered(self) -> None:
        with self._state:
            if not self._failing:
                return
            self._failing = False
            self._backoff = 0.0
        log.info("rate limit store %s reachable again", safe_url(self.url))


_stores: dict[str, RedisStore] = {}
_stores_lock = threading.Lock()


def redis_store(url: str) -> RedisStore:
    """This process's store for `url`, kept across reloads (its connections and its outage
    state with it)."""
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = RedisStore(url)
        return store
