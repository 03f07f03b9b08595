"""The WSGI face: check the request target, route it, set up its headers and body (an
upgrade's too), then hand it to the one attempt loop (attempts.py).

The backend side of an exchange (sockets, request head, response parsing) is upstream.py.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Iterable
from typing import Any

from gol7lb import tunnel
from gol7lb.accesslog import AccessLog
from gol7lb.attempts import CLOSE, AttemptLoop, StartResponse
from gol7lb.bodies import NO_BODY, ClientBodyError, RequestBody
from gol7lb.compress import Negotiated
from gol7lb.counters import SharedCounters
from gol7lb.exchange import Exchange
from gol7lb.headers import request_id, upstream_request_headers
from gol7lb.hosts import WorkerCells
from gol7lb.manager import ControlClient
from gol7lb.metrics import RequestRecorder
from gol7lb.mirror import SKIPPED, TOO_LARGE, Copy, Mirror
from gol7lb.pools import MirrorSpec
from gol7lb.pooltable import PoolRuntime, PoolTable
from gol7lb.ratelimit import Limiter
from gol7lb.routing import strip_prefix
from gol7lb.rules import Answer, CompiledRules, RuleRequest
from gol7lb.target import AmbiguousTarget, normalise_path, valid_authority
from gol7lb.upstream import request_head
from gol7lb.view import CachedView

log = logging.getLogger("gol7lb.proxy")

_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BAD_TARGET_CHAR = re.compile(r"[\x00-\x20\x7f]")



def split_target(raw: str) -> tuple[str, str | None]:
    """Origin-form target and, for an absolute-form request, the authority that replaces Host.

    The authority never chooses where to connect; it only becomes the Host header, as
    RFC 9112 section 3.2.2 asks of a server receiving absolute-form. An empty authority, or
    one with userinfo (RFC 9110 4.2.4: treat it as an error), is a ValueError.
    """
    if raw.startswith("/") or raw == "*":
        return raw, None
    match = _ABSOLUTE_FORM.match(raw)
    if not match:
        raise ValueError(raw)
    rest = raw[match.end():]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority = rest[:cut]
    path = rest[cut:]
    if not path.startswith("/"):
        path = "/" + path
    if not authority or not valid_authority(authority):
        raise ValueError(raw)
    return path, authority


class ProxyApp(AttemptLoop):
    """The WSGI application each gunicorn worker runs."""

    def __init__(self, view: CachedView[PoolTable], counters: SharedCounters,
                 cells: WorkerCells, client: ControlClient | None = None, threads: int = 32,
                 recorder: RequestRecorder | None = None,
                 access_log: AccessLog | None = None) -> None:
        super().__init__(counters, cells, client, threads, recorder or RequestRecorder())
        self.view = view
        self.access_log = access_log or AccessLog()
        self.mirror = Mirror(self.recorder)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        rid = request_id(environ)
        method = environ["REQUEST_METHOD"]
        raw = environ.get("RAW_URI") or environ.get("PATH_INFO") or "/"
        table = self.view.current()
        if table.rebuild_at <= time.monotonic():
            table = self.view.rebuild()  # slow start: the next step of a ramp, no IPC
        exchange = Exchange(self, method, raw, environ.get("REMOTE_ADDR") or "-", rid,
                            table.settings.log, environ.get("SERVER_PROTOCOL") or "HTTP/1.1")
        if method == "CONNECT":
            return self._error(start_response, exchange, 405, "CONNECT is not supported: this "
                               "is a reverse proxy", [("Allow", "GET, HEAD, POST, PUT, DELETE, "
                                                       "PATCH, OPTIONS")])
        host = environ.get("HTTP_HOST")
        try:
            if not raw.isascii() or _BAD_TARGET_CHAR.search(raw):
                raise ValueError(raw)
            target, authority = split_target(raw)
            given_path, query_mark, query = target.partition("?")
            path = normalise_path(given_path)  # routes match this; `target` goes on as it came
        except AmbiguousTarget as e:
            return self._error(start_response, exchange, 400, f"ambiguous request target: {e}",
                               CLOSE)
        except ValueError:
            return self._error(start_response, exchange, 400, "bad request target", CLOSE)
        if host and not valid_authority(host):  # our worker's parser has refused it already
            return self._error(start_response, exchange, 400, "invalid Host header", CLOSE)

        match = table.router.match(environ, path, method, authority or host)
        if match is None:
            return self._error(start_response, exchange, 404, "no route matches this request "
                               "and there is no default pool")
        original = path
        if match.strip:  # from the normalised path, the one the prefix matched
            target = strip_prefix(path + query_mark + query, match.strip)
            path = target.partition("?")[0]
        pool_name = match.pool
        rules = match.rules
        request = None
        if rules is not None:  # the route's rules, in the contract's order (rules.py)
            request = RuleRequest(environ, original, path, target, authority or host or "",
                                  table.forwarded.client_address(environ), rules.prefix)
            answer = rules.admit(request)  # access: deny, allow, basic_auth
            if answer is not None:
                return self._rule_answer(start_response, exchange, rules, answer)
        limiter = table.limits.by_route[match.index]
        if limiter is not None:  # the rate limit, after access and before redirect/respond
            limited = self._rate_limit(limiter, environ, original, start_response, exchange)
            if limited is not None:
                return limited
        if rules is not None and request is not None:
            answer = rules.run(request)  # redirect/respond, rewrite
            if answer is not None:
                return self._rule_answer(start_response, exchange, rules, answer)
            target, path = request.target, request.path
            exchange.rules = rules  # response_headers, from here on (attempts.py)
            if rules.split is not None:
                pool_name = rules.split.pick()
        if not pool_name:  # top-level rules without redirect/respond, and no default pool
            return self._error(start_response, exchange, 404, "no route matches this request "
                               "and there is no default pool")
        pool = table.pools[pool_name]
        exchange.pool = pool.name

        if "HTTP_UPGRADE" in environ and tunnel.is_upgrade(environ):
            return self._upgrade(environ, start_response, table, pool, exchange, target, authority)
        try:
            body = self._request_body(environ, table)
        except ClientBodyError as e:
            return self._body_error(start_response, exchange, e)
        client_sock = environ.get("gunicorn.socket")
        headers = self.request_headers(environ, table, authority, client_sock, rid)
        if rules is not None and rules.request_headers is not None:
            rules.request_headers.request(headers)
        body.framing(headers)
        route = match.route
        negotiated: Negotiated | None = None
        if route is not None:
            if route.mirror is not None and self.mirror.sampled(route.mirror.percent):
                self._mirror(environ, table, route.mirror, method, target, path, headers, body)
            if route.compress and table.compression is not None:
                negotiated = table.compression.negotiate(environ, method)
        return self.forward(environ, start_response, table, pool, exchange, target, path,
                            headers, body, client_sock, negotiated=negotiated)

    def _mirror(self, environ: dict[str, Any], table: PoolTable, spec: MirrorSpec,
                method: str, target: str, path: str, headers: dict[str, str],
                body: RequestBody) -> None:
        """A copy of this request (same method, target, headers and held body) onto the
        worker's mirror queue; a body the LB does not hold whole is not copied (counted)."""
        if body.kept is None:
            self.recorder.mirror(SKIPPED if body.deferred else TOO_LARGE)
            return
        shadow = table.pools[spec.pool]
        self.mirror.submit(Copy(shadow, self._context(table, shadow, environ, path),
                                table.connections, method, request_head(method, target, headers),
                                body.kept))

    def _rule_answer(self, start_response: StartResponse, exchange: Exchange,
                     rules: CompiledRules, answer: Answer) -> Iterable[bytes]:
        """A route's rules answered (403, 401, a redirect, a fixed answer): no backend."""
        if answer.denied:
            self.recorder.denied(rules.label, answer.denied)
        return self._own_answer(start_response, exchange, answer.status, answer.body,
                                list(answer.headers))

    def _rate_limit(self, limiter: Limiter, environ: dict[str, Any], path: str,
                    start_response: StartResponse, exchange: Exchange) -> list[bytes] | None:
        """None when the request took a token (or the store is down and on_store_error is
        allow); else the 429."""
        outcome = limiter.check(environ, path)
        if outcome is None:
            return None
        if outcome.store_error:
            self.recorder.rate_limit_store_error(limiter.spec.name)
        if outcome.refused is None:
            return None
        self.recorder.rate_limited(limiter.route)
        return self._error(start_response, exchange, 429, "rate limit exceeded",
                           outcome.refused)

    @staticmethod
    def request_headers(environ: dict[str, Any], table: PoolTable, authority: str | None,
                        client_sock: socket.socket | None, rid: str) -> dict[str, str]:
        port = environ.get("gol7lb.local_port")  # our worker knows it; gthread does not
        if port is None:
            try:
                port = str(client_sock.getsockname()[1]) if client_sock else \
                    environ["SERVER_PORT"]
            except OSError:
                port = environ.get("SERVER_PORT", "")
        host = authority or environ.get("HTTP_HOST") or ""
        return upstream_request_headers(environ, host, port, rid, table.forwarded)

    @staticmethod
    def _request_body(environ: dict[str, Any], table: PoolTable) -> RequestBody:
        if "HTTP_TRANSFER_ENCODING" not in environ and not environ.get("CONTENT_LENGTH"):
            return NO_BODY
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        length = 0 if chunked else int(environ.get("CONTENT_LENGTH") or 0)
        # Only our worker leaves `100 Continue` to the first read; gunicorn's own workers
        # have sent it before the app runs, so there is nothing to wait for.
        deferred = "gol7lb.local_port" in environ and \
            environ.get("SERVER_PROTOCOL") == "HTTP/1.1" and \
            environ.get("HTTP_EXPECT", "").lower() == "100-continue"
        return RequestBody(environ["wsgi.input"], length, chunked,
                           table.settings.proxy.retry_buffer, deferred)

    def _upgrade(self, environ: dict[str, Any], start_response: StartResponse,
                 table: PoolTable, pool: PoolRuntime, exchange: Exchange, target: str,
                 authority: str | None) -> Iterable[bytes]:
        """Send the upgrade request through the one attempt loop (retry_on, retries,
        queue_timeout and their counters as for any request); a `101` goes on to `tunnel.switch`,
        anything else is relayed as a normal answer."""
        client_sock = environ.get("gunicorn.socket")
        if client_sock is None or environ.get("CONTENT_LENGTH") or environ.get(
                "HTTP_TRANSFER_ENCODING"):
            return self._error(start_response, exchange, 400, "upgrade request with a body",
                               close=True)
        headers = self.request_headers(environ, table, authority, client_sock, exchange.rid)
        rules = exchange.rules
        if rules is not None and rules.request_headers is not None:
            rules.request_headers.request(headers)
        headers["Upgrade"] = environ["HTTP_UPGRADE"]
        headers["Connection"] = "upgrade"
        path = target.split("?", 1)[0]
        return self.forward(environ, start_response, table, pool, exchange, target, path, headers,
                            NO_BODY, client_sock, upgrade=True)
