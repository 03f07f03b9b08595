"""Route rules (contract v3, "Route rules"): allow/deny, basic_auth, redirect, respond, rewrite,
request_headers, response_headers and split, read from a `[[routes]]` entry (or the top level,
for requests that match no route) into frozen values, and compiled once per configuration
into a `CompiledRules` the proxy runs per request without parsing anything.

The request side is a short ordered pipeline (`PIPELINE`), in the contract's order:

    access (allow/deny, then basic_auth)
    rate_limit            (ratelimit.py; the proxy runs it between `admit` and `run`)
    answer (redirect or respond: the LB answers, no backend)
    rewrite
then the proxy applies request_headers, the pick (pool or split), mirror (another module),
response_headers where the answer's headers are made, and compress (another module).

Patterns run on RE2 (the `google-re2` package): matching takes linear time whatever the
pattern, so no rewrite can backtrack catastrophically; what RE2 does not support
(backreferences, lookaround) is refused at load.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import itertools
import re
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bcrypt
import re2

from gol7lb.errors import ConfigError

# The rule keys a [[routes]] entry may have (pools.py adds them to its match keys), and those
# that make sense on the top level for requests that match no route (split needs a route:
# the unrouted requests' pool is the [[backends]] list).
RULE_KEYS = ("allow", "deny", "basic_auth", "redirect", "respond", "rewrite",
             "request_headers", "response_headers", "split")
TOP_LEVEL_RULE_KEYS = tuple(k for k in RULE_KEYS if k != "split")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
PLACEHOLDERS = ("scheme", "host", "path", "path_rest", "query", "uri")
SPLIT_TOTAL = 100  # split weights are whole percentages that add up to exactly this
UNMATCHED = "unmatched"  # the route label of requests that match no route (top-level rules)
AUTH_CACHE_SIZE = 1024  # Authorization values remembered per configuration (ok and refused)
AUTH_WAIT_SECONDS = 10.0  # the longest a request waits for another's check of its value
VERDICT_CACHE_SIZE = 65536  # client addresses remembered per route by allow/deny

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
_URL_TEXT = re.compile(r"[\x21-\x7e]*")  # redirect targets and rewritten paths: no space
_BCRYPT = re.compile(r"\$2[abxy]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TEMPLATE_PART = re.compile(r"\\(?:g<([^>]*)>|([0-9]+)|(\\))")  # \g<name> \1 \\
# Names a header rule may not touch: framing and hop-by-hop fields are the LB's to write.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive",
                      "upgrade", "te", "trailer", "proxy-connection"})

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is our one-line error, not absl's log


# -- declared values (frozen, picklable: they travel in Settings through the Manager) ----------

@dataclass(frozen=True)
class BasicAuth:
    realm: str
    users: tuple[tuple[str, str], ...]  # (name, bcrypt hash)


@dataclass(frozen=True)
class Redirect:
    to: str
    status: int = 302


@dataclass(frozen=True)
class Respond:
    status: int = 200
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Rewrite:
    path_regex: str
    replace: str


@dataclass(frozen=True)
class HeaderRules:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def describe(self) -> dict[str, Any]:
        return {"set": dict(self.set), "add": dict(self.add), "remove": list(self.remove)}


@dataclass(frozen=True)
class Rules:
    """One route's rules as the file declares them (all optional)."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    basic_auth: BasicAuth | None = None
    redirect: Redirect | None = None
    respond: Respond | None = None
    rewrite: Rewrite | None = None
    request_headers: HeaderRules = field(default_factory=HeaderRules)
    response_headers: HeaderRules = field(default_factory=HeaderRules)
    split: tuple[tuple[str, int], ...] = ()  # (pool, weight in percent)

    def __bool__(self) -> bool:
        return self != NO_RULES

    @property
    def answers(self) -> bool:
        """The LB answers every request that passes access itself (no pool needed)."""
        return self.redirect is not None or self.respond is not None

    def describe(self) -> dict[str, Any]:
        """For /status: every rule that is on (user names, never their hashes)."""
        found: dict[str, Any] = {}
        if self.allow:
            found["allow"] = list(self.allow)
        if self.deny:
            found["deny"] = list(self.deny)
        if self.basic_auth:
            found["basic_auth"] = {"realm": self.basic_auth.realm,
                                   "users": [name for name, _ in self.basic_auth.users]}
        if self.redirect:
            found["redirect"] = {"to": self.redirect.to, "status": self.redirect.status}
        if self.respond:
            found["respond"] = {"status": self.respond.status, "body": self.respond.body,
                                "content_type": self.respond.content_type}
        if self.rewrite:
            found["rewrite"] = {"path_regex": self.rewrite.path_regex,
                                "replace": self.rewrite.replace}
        for key in ("request_headers", "response_headers"):
            rules: HeaderRules = getattr(self, key)
            if rules:
                found[key] = rules.describe()
        if self.split:
            found["split"] = [{"pool": pool, "weight": weight} for pool, weight in self.split]
        return found


NO_RULES = Rules()


# -- reading and validating ---------------------------------------------------------------------

def describe_match(host: str, prefix: str, methods: Sequence[str],
                   headers: Sequence[tuple[str, str]]) -> str:
    """A route's match in one short stable text: its metrics label and its name in errors."""
    parts = []
    if host:
        parts.append(f"host={host}")
    if prefix:
        parts.append(f"path_prefix={prefix}")
    if methods:
        parts.append("methods=" + ",".join(sorted(methods)))
    if headers:
        parts.append("headers=" + ",".join(f"{k}:{v}" for k, v in headers))
    return " ".join(parts) or "any request"


class _Reader:
    """Reads one table's rule keys; every refusal is one line naming the key and the route."""

    def __init__(self, where: str, origin: str) -> None:
        self.where = where  # "routes[2]" or "" on the top level
        self.origin = origin  # "in FILE; the route routes[2] path_prefix=/old/"

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def bad(self, key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"invalid setting {self.name(key)} = {value!r} ({self.origin}): "
                           f"must be {allowed}")

    def table(self, key: str, value: Any, allowed_keys: Sequence[str],
              example: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(key, value, f"a table like {example}")
        extra = sorted(set(value) - set(allowed_keys))
        if extra:
            raise ConfigError(f"unknown setting {self.name(key)}.{extra[0]} ({self.origin}): "
                              "allowed are " + ", ".join(allowed_keys))
        return value

    def header_text(self, key: str, value: Any, what: str) -> str:
        """Text that goes into a header: never CR, LF or NUL (nor other controls)."""
        if not isinstance(value, str):
            raise self.bad(key, value, what)
        if any(c in value for c in "\r\n\0"):
            raise self.bad(key, value, f"{what} without CR, LF or NUL (header injection)")
        if not _HEADER_VALUE.fullmatch(value):
            raise self.bad(key, value, f"{what} of printable ASCII")
        return value


def rules_from_toml(item: Mapping[str, Any], where: str, origin: str,
                    keys: Sequence[str] = RULE_KEYS) -> Rules:
    """The rule keys of one [[routes]] entry (or of the top level, `where` = "")."""
    read = _Reader(where, origin)
    found: dict[str, Any] = {}
    for key in ("allow", "deny"):
        if key in item:
            found[key] = _networks(read, key, item[key])
    if "basic_auth" in item:
        found["basic_auth"] = _basic_auth(read, item["basic_auth"])
    if "redirect" in item:
        found["redirect"] = _redirect(read, item["redirect"])
    if "respond" in item:
        if "redirect" in item:
            raise read.bad("respond", item["respond"], "left out: a route answers with redirect "
                           "or respond, not both")
        found["respond"] = _respond(read, item["respond"])
    if "rewrite" in item:
        found["rewrite"] = _rewrite(read, item["rewrite"])
    for key in ("request_headers", "response_headers"):
        if key in item:
            found[key] = _header_rules(read, key, item[key], request=key == "request_headers")
    if "split" in item and "split" in keys:
        found["split"] = _split(read, item["split"])
    return Rules(**found)


def _networks(read: _Reader, key: str, value: Any) -> tuple[str, ...]:
    allowed = 'a list of CIDRs or addresses like ["10.0.0.0/8", "2001:db8::/32"]'
    if not isinstance(value, list):
        raise read.bad(key, value, allowed)
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except (TypeError, ValueError):
            raise read.bad(key, entry, f"{allowed} (this one is not a CIDR)") from None
    return tuple(value)


def _basic_auth(read: _Reader, value: Any) -> BasicAuth:
    table = read.table("basic_auth", value, ("realm", "users"),
                       '{ realm = "ops", users = { alice = "$2b$12$..." } }')
    realm = read.header_text("basic_auth.realm", table.get("realm", "restricted"), "a realm")
    if '"' in realm or "\\" in realm:
        raise read.bad("basic_auth.realm", realm, 'a realm without " or \\')
    users = table.get("users")
    if not isinstance(users, dict) or not users:
        raise read.bad("basic_auth.users", users, 'a table of user names and bcrypt hashes '
                       'like { alice = "$2b$12$..." } (make one with htpasswd -nbBC 12 alice PW)')
    for name, hashed in users.items():
        if not name or ":" in name or not name.isprintable():
            raise read.bad("basic_auth.users", name, "user names without ':'")
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
            raise read.bad(f"basic_auth.users.{name}", hashed, "a bcrypt hash like "
                           '"$2b$12$" + 53 characters (bcrypt hashes only: htpasswd -nbBC 12 '
                           "NAME PASSWORD makes one)")
    return BasicAuth(realm, tuple(sorted(users.items())))


def _redirect(read: _Reader, value: Any) -> Redirect:
    table = read.table("redirect", value, ("to", "status"),
                       '{ to = "https://example.com{uri}", status = 308 }')
    to = table.get("to")
    if not isinstance(to, str) or not to:
        raise read.bad("redirect.to", to, "a URL, with placeholders {" + "} {".join(
            PLACEHOLDERS) + "}")
    read.header_text("redirect.to", to, "a URL")
    if not _URL_TEXT.fullmatch(to):
        raise read.bad("redirect.to", to, "a URL without spaces")
    names = _PLACEHOLDER.findall(to)
    literal = _PLACEHOLDER.sub("", to)
    if any(name not in PLACEHOLDERS for name in names) or "{" in literal or "}" in literal:
        raise read.bad("redirect.to", to, "a URL whose placeholders are among {"
                       + "} {".join(PLACEHOLDERS) + "}")
    status = table.get("status", 302)
    if status not in REDIRECT_STATUSES or isinstance(status, bool):
        raise read.bad("redirect.status", status, "one of 301, 302, 303, 307, 308")
    return Redirect(to, status)


def _respond(read: _Reader, value: Any) -> Respond:
    table = read.table("respond", value, ("status", "body", "content_type"),
                       '{ status = 200, body = "pong\\n" }')
    status = table.get("status", 200)
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise read.bad("respond.status", status, "a status from 200 to 599")
    body = table.get("body", "")
    if not isinstance(body, str):
        raise read.bad("respond.body", body, "a string")
    if body and status in (204, 304):
        raise read.bad("respond.body", body, f'"" with status {status} (it has no body)')
    content_type = read.header_text("respond.content_type",
                                    table.get("content_type", Respond.content_type),
                                    "a media type")
    return Respond(status, body, content_type)


def compile_regex(pattern: str) -> Any:
    """RE2: linear time whatever the input; raises re2.error for what RE2 cannot run. On
    bytes: paths are ASCII here, and the wrapper is about twice as fast on bytes."""
    return re2.compile(pattern.encode(), _RE2_OPTIONS)


def compile_template(replace: str, regex: Any) -> tuple[bytes | int, ...]:
    """`replace` cut once into literal bytes and group numbers (\\1, \\g<name>, \\g<1>;
    \\\\ is a backslash). ValueError for a group the pattern has not, or another escape."""
    parts: list[bytes | int] = []
    pos = 0
    for found in _TEMPLATE_PART.finditer(replace):
        parts.append(replace[pos:found.start()].encode())
        name, number, backslash = found.groups()
        if backslash:
            parts.append(b"\\")
        else:
            group = int(number or name) if (number or name.isdigit()) else \
                regex.groupindex.get(name.encode(), -1)  # a bytes pattern's names are bytes
            if not 0 <= group <= regex.groups:
                raise ValueError(f"it refers to a group path_regex has not (it has "
                                 f"{regex.groups} groups)")
            parts.append(group)
        pos = found.end()
    parts.append(replace[pos:].encode())
    if any(isinstance(part, bytes) and b"\\" in part for part in parts[::2]):
        raise ValueError("a backslash starts \\1, \\g<name> or \\\\ only")
    return tuple(part for part in parts if part != b"")


def _rewrite(read: _Reader, value: Any) -> Rewrite:
    table = read.table("rewrite", value, ("path_regex", "replace"),
                       '{ path_regex = "^/v1/(.*)$", replace = "/v2/\\\\1" }')
    pattern = table.get("path_regex")
    if not isinstance(pattern, str) or not pattern:
        raise read.bad("rewrite.path_regex", pattern, "a regular expression (RE2 syntax)")
    try:
        regex = compile_regex(pattern)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise read.bad("rewrite.path_regex", pattern, "a regular expression RE2 can run in "
                       f"linear time (no backreferences or lookaround): {reason}") from None
    replace = table.get("replace")
    if not isinstance(replace, str):
        raise read.bad("rewrite.replace", replace, "a path, with \\1 or \\g<name> for groups")
    read.header_text("rewrite.replace", replace, "a path")
    if not _URL_TEXT.fullmatch(replace) or "?" in replace or "#" in replace:
        raise read.bad("rewrite.replace", replace, "a path without spaces, ? or #")
    try:
        compile_template(replace, regex)
    except ValueError as e:
        raise read.bad("rewrite.replace", replace, f"a path with \\1 or \\g<name> for groups: "
                       f"{e}") from None
    return Rewrite(pattern, replace)


def _header_rules(read: _Reader, key: str, value: Any, request: bool) -> HeaderRules:
    table = read.table(key, value, ("set", "add", "remove"),
                       '{ set = { "X-Env" = "prod" }, add = {}, remove = ["X-Debug"] }')
    seen: dict[str, str] = {}
    found: dict[str, Any] = {}
    for op in ("set", "add"):
        pairs = table.get(op, {})
        if not isinstance(pairs, dict):
            raise read.bad(f"{key}.{op}", pairs, 'a table of header names and values like '
                           '{ "X-Env" = "prod" }')
        for name, text in pairs.items():
            _header_name(read, f"{key}.{op}", name, op, request, seen)
            read.header_text(f"{key}.{op}.{name}", text, "a header value")
        found[op] = tuple(pairs.items())
    remove = table.get("remove", [])
    if not isinstance(remove, list):
        raise read.bad(f"{key}.remove", remove, 'a list of header names like ["X-Debug"]')
    for name in remove:
        _header_name(read, f"{key}.remove", name, "remove", request, seen)
    return HeaderRules(found["set"], found["add"], tuple(remove))


def _header_name(read: _Reader, at: str, name: Any, op: str, request: bool,
                 seen: dict[str, str]) -> None:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise read.bad(at, name, "header names (letters, digits and !#$%&'*+-.^_`|~)")
    lower = name.lower()
    if lower in _FRAMING:
        raise read.bad(at, name, "a header other than the framing and hop-by-hop ones "
                       "(Content-Length, Transfer-Encoding, Connection...), which the LB writes")
    if request and lower == "host" and op != "set":
        raise read.bad(at, name, "set only (a request always has one Host)")
    if lower in seen:
        raise read.bad(at, name, f"in one of set, add, remove only (it is in {seen[lower]} too)")
    seen[lower] = op


def _split(read: _Reader, value: Any) -> tuple[tuple[str, int], ...]:
    allowed = ('a list like [ { pool = "v1", weight = 90 }, { pool = "v2", weight = 10 } ] of '
               f"distinct pools whose weights, whole numbers from 0 to {SPLIT_TOTAL}, add up to "
               f"{SPLIT_TOTAL}")
    if not isinstance(value, list) or not value:
        raise read.bad("split", value, allowed)
    entries = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"pool", "weight"} or \
                not isinstance(entry["pool"], str) or isinstance(entry["weight"], bool) or \
                not isinstance(entry["weight"], int) or not 0 <= entry["weight"] <= SPLIT_TOTAL:
            raise read.bad("split", entry, allowed)
        entries.append((entry["pool"], entry["weight"]))
    pools = [pool for pool, _ in entries]
    if len(set(pools)) != len(pools):
        raise read.bad("split", value, f"{allowed} (a pool is listed twice)")
    total = sum(weight for _, weight in entries)
    if total != SPLIT_TOTAL:
        raise read.bad("split", value, f"{allowed} (these add up to {total})")
    return tuple(entries)


# -- compiled, per configuration ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Answer:
    """What the LB answers itself instead of going to a backend."""

    status: int
    body: bytes
    headers: list[tuple[str, str]]
    denied: str = ""  # the rule key that refused the request (metrics reason), "" otherwise


class RuleRequest:
    """One request as the rules see it; `rewrite` changes target and path in place."""

    __slots__ = ("environ", "original", "path", "target", "query", "host", "client", "prefix")

    def __init__(self, environ: Mapping[str, Any], original: str, path: str, target: str,
                 host: str, client: str, prefix: str) -> None:
        self.environ = environ
        self.original = original  # the normalised path routes matched
        self.path = path  # the same after strip_prefix
        self.target = target  # what goes to the backend
        self.query = target.partition("?")[2]
        self.host = host
        self.client = client  # after trusted_proxies (and PROXY protocol)
        self.prefix = prefix  # the route's path_prefix ("" for none)


Stage = Callable[[RuleRequest], Answer | None]


class Access:
    """allow/deny on the client address: deny first, then allow (when given); each address's
    verdict is remembered (bounded), so a request is one dict look-up."""

    def __init__(self, allow: Sequence[str], deny: Sequence[str]) -> None:
        self.allow = tuple(ipaddress.ip_network(n, strict=False) for n in allow)
        self.deny = tuple(ipaddress.ip_network(n, strict=False) for n in deny)
        self._verdicts: dict[str, str] = {}

    def refusal(self, client: str) -> str:
        """"" when the address may pass, else the key that refuses it ("deny" or "allow")."""
        verdict = self._verdicts.get(client)
        if verdict is None:
            try:
                ip: Any = ipaddress.ip_address(client)
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
            except ValueError:
                ip = None
            if ip is not None and any(ip in net for net in self.deny):
                verdict = "deny"
            elif self.allow and (ip is None or not any(ip in net for net in self.allow)):
                verdict = "allow"
            else:
                verdict = ""
            if len(self._verdicts) < VERDICT_CACHE_SIZE:
                self._verdicts[client] = verdict
        return verdict


class BasicAuthCheck:
    """bcrypt costs 0.1-0.3 s a check: each Authorization value's verdict is remembered
    (keyed by its SHA-256, bounded), so a client pays it once per configuration. Requests
    that bring the same new value at once wait for the one check (a browser opening 16
    connections must not run bcrypt 16 times)."""

    def __init__(self, auth: BasicAuth) -> None:
        self.users = {name.encode(): hashed.encode() for name, hashed in auth.users}
        self._decoy = next(iter(self.users.values()))  # a check for unknown names too
        self.challenge = [("WWW-Authenticate", f'Basic realm="{auth.realm}", charset="UTF-8"')]
        self._verdicts: dict[bytes, bool] = {}
        self._pending: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()

    def passes(self, header: str | None) -> bool:
        if not header:
            return False
        key = hashlib.sha256(header.encode("latin-1", "replace")).digest()
        verdict = self._verdicts.get(key)
        if verdict is not None:
            return verdict
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                return verdict
            running = self._pending.get(key)
            if running is None:
                done = self._pending[key] = threading.Event()
        if running is not None:  # another thread checks this very value: wait for it
            running.wait(AUTH_WAIT_SECONDS)
            return self._verdicts.get(key) is True
        try:
            verdict = self._check(header)
            if len(self._verdicts) >= AUTH_CACHE_SIZE:
                self._verdicts.clear()  # cheap and rare: clients re-earn theirs once
            self._verdicts[key] = verdict
        finally:
            with self._lock:
                del self._pending[key]
            done.set()
        return verdict

    def _check(self, header: str) -> bool:
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        name, colon, password = decoded.partition(b":")
        if not colon:
            return False
        hashed = self.users.get(name)
        # bcrypt reads 72 bytes (htpasswd and bcrypt < 5 cut longer passwords there silently;
        # bcrypt 5 raises instead), and an unknown name costs the same check as a known one
        ok = bcrypt.checkpw(password[:72], hashed or self._decoy)
        return ok and hashed is not None


class HeaderEdit:
    """set, add, remove on a header section, names compared without case."""

    def __init__(self, rules: HeaderRules) -> None:
        self.set = rules.set
        self.add = rules.add
        self.gone = frozenset(name.lower() for name in rules.remove) | frozenset(
            name.lower() for name, _ in rules.set)

    def request(self, headers: MutableMapping[str, str]) -> None:
        """The upstream request's headers (one value per name, repeated ones joined)."""
        for name in [n for n in headers if n.lower() in self.gone]:
            del headers[name]
        for name, value in self.set:
            headers[name] = value
        for name, value in self.add:
            lower = name.lower()
            present = next((n for n in headers if n.lower() == lower), None)
            if present is None:
                headers[name] = value
            else:
                headers[present] = f"{headers[present]}, {value}"

    def response(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The client's answer's headers (repeated fields kept as they are)."""
        gone = self.gone
        kept = [pair for pair in headers if pair[0].lower() not in gone] if gone else headers
        return [*kept, *self.set, *self.add]


class Split:
    """Weighted pools: a fixed schedule of SPLIT_TOTAL picks, interleaved smoothly (nginx's
    smooth weighted round robin), walked by a per-worker counter: exact shares per 100 requests
    of each worker, no shared state, no random."""

    def __init__(self, split: Sequence[tuple[str, int]]) -> None:
        current = [0] * len(split)
        schedule = []
        for _ in range(SPLIT_TOTAL):
            for i, (_, weight) in enumerate(split):
                current[i] += weight
            best = max(range(len(split)), key=lambda i: current[i])
            current[best] -= SPLIT_TOTAL
            schedule.append(split[best][0])
        self.schedule = tuple(schedule)
        self._tickets = itertools.count()  # next() is atomic under the GIL

    def pick(self) -> str:
        return self.schedule[next(self._tickets) % SPLIT_TOTAL]


def _placeholder_values(request: RuleRequest) -> dict[str, str]:
    path = request.original
    rest = path[len(request.prefix.rstrip("/")):] if request.prefix else path
    query = request.query
    uri = request.environ.get("RAW_URI") or path
    return {"scheme": request.environ.get("wsgi.url_scheme", "http"), "host": request.host,
            "path": path, "path_rest": rest if rest.startswith("/") else "/" + rest,
            "query": query, "uri": uri if uri.startswith("/") else path + (
                "?" + query if query else "")}


def _answer_text(status: int, message: str) -> bytes:
    from http import HTTPStatus
    return f"{status} {HTTPStatus(status).phrase}: {message}\n".encode()


def access_stage(rules: Rules, label: str) -> Stage | None:
    """allow/deny (403), then basic_auth (401 with WWW-Authenticate)."""
    access = Access(rules.allow, rules.deny) if rules.allow or rules.deny else None
    auth = BasicAuthCheck(rules.basic_auth) if rules.basic_auth else None
    if access is None and auth is None:
        return None
    forbidden = _answer_text(403, "access denied")
    unauthorized = _answer_text(401, "authentication required")

    def run(request: RuleRequest) -> Answer | None:
        if access is not None:
            refused = access.refusal(request.client)
            if refused:
                return Answer(403, forbidden, [], refused)
        if auth is not None and not auth.passes(request.environ.get("HTTP_AUTHORIZATION")):
            return Answer(401, unauthorized, list(auth.challenge), "basic_auth")
        return None
    return run


def answer_stage(rules: Rules, label: str) -> Stage | None:
    """redirect (Location from the template) or respond (a fixed answer)."""
    if rules.respond is not None:
        respond = rules.respond
        fixed = Answer(respond.status, respond.body.encode(),
                       [("Content-Type", respond.content_type)])
        return lambda request: fixed
    if rules.redirect is None:
        return None
    status = rules.redirect.status
    # the template split once: literal, placeholder, literal, ... (placeholders at odd places)
    parts = _PLACEHOLDER.split(rules.redirect.to)
    body = _answer_text(status, "moved")

    def run(request: RuleRequest) -> Answer:
        values = _placeholder_values(request)
        location = "".join(part if i % 2 == 0 else values[part] for i, part in enumerate(parts))
        return Answer(status, body, [("Location", location)])
    return run


def rewrite_stage(rules: Rules, label: str) -> Stage | None:
    """The path (after strip_prefix) through the RE2 pattern, every match replaced (an empty
    match right after a match is not, so "(.*)" rewrites a path once); the query goes on
    unchanged. One RE2 search for the usual anchored patterns."""
    if rules.rewrite is None:
        return None
    regex = compile_regex(rules.rewrite.path_regex)
    template = compile_template(rules.rewrite.replace, regex)

    def run(request: RuleRequest) -> None:
        raw = request.path.encode("latin-1")  # normalised paths are ASCII
        end = len(raw)
        found = regex.search(raw)
        if found is None:
            return
        pieces = []
        pos = 0
        while found is not None:
            start, stop = found.span()
            pieces.append(raw[pos:start])
            pieces += [part if isinstance(part, bytes) else found.group(part) or b""
                       for part in template]
            pos = stop
            if stop == end:
                break
            if start == stop:  # an empty match: step over one character
                pieces.append(raw[stop:stop + 1])
                pos = stop + 1
            found = regex.search(raw, pos)
        pieces.append(raw[pos:])
        path = b"".join(pieces).decode("latin-1")
        path = path if path.startswith("/") else "/" + path
        request.path = path
        request.target = path + ("?" + request.query if request.query else "")
    return run


# The contract's order. Another rule inserts its (name, factory) at its place, e.g. the rate
# limit at PIPELINE.index("access") + 1. A factory gets the route's rules and its label (the
# metrics' route name) once per configuration and returns None when its rule is off, so a
# route pays only for the rules it has.
PIPELINE: list[tuple[str, Callable[[Rules, str], Stage | None]]] = [
    ("access", access_stage),
    # the rate limit comes here: after access, before redirect/respond (proxy.py runs it
    # between CompiledRules.admit and CompiledRules.run, with ratelimit.py's limiters)
    ("answer", answer_stage),
    ("rewrite", rewrite_stage),
]


class CompiledRules:
    """One route's rules, compiled once per configuration."""

    def __init__(self, rules: Rules, label: str, prefix: str) -> None:
        self.rules = rules
        self.label = label  # the metrics route label, e.g. "routes[0] path_prefix=/api/"
        self.prefix = prefix
        # access first (`admit`); the rate limit (ratelimit.py, whose budgets belong to the
        # per-configuration table) runs between it and the other stages (`run`)
        self.access = access_stage(rules, label)
        self.stages: tuple[Stage, ...] = tuple(
            stage for stage in (factory(rules, label) for name, factory in PIPELINE
                                if name != "access")
            if stage is not None)
        self.request_headers = HeaderEdit(rules.request_headers) if rules.request_headers \
            else None
        self.response_headers = HeaderEdit(rules.response_headers) if rules.response_headers \
            else None
        self.split = Split(rules.split) if rules.split else None

    def admit(self, request: RuleRequest) -> Answer | None:
        """The access rules (deny, allow, basic_auth): a 403/401, or None to go on."""
        return self.access(request) if self.access is not None else None

    def run(self, request: RuleRequest) -> Answer | None:
        """The stages after the rate limit: redirect or respond, then rewrite."""
        for stage in self.stages:
            answer = stage(request)
            if answer is not None:
                return answer
        return None


_COMPILED: dict[tuple[Rules, str, str], CompiledRules] = {}


def compiled(rules: Rules, label: str, prefix: str) -> CompiledRules | None:
    """The same CompiledRules for as long as the configuration keeps these rules, so the
    verdict caches (basic_auth's above all) outlive the per-generation tables (health
    changes rebuild those); None for a route without rules."""
    if not rules:
        return None
    key = (rules, label, prefix)
    found = _COMPILED.get(key)
    if found is None:
        if len(_COMPILED) >= 4096:
            _COMPILED.clear()
        found = _COMPILED[key] = CompiledRules(rules, label, prefix)
    return found
