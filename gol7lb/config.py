"""Settings: defaults < TOML file (GOL7LB_CONFIG) < environment, validated before anything starts.

Every setting is declared once in `SETTINGS`; the TOML reader, the environment reader, the
validation messages and the README's settings table all come from that one list.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gol7lb.backends import (
    Backend,
    BackendError,
    check_weight,
    parse_backend_list,
    parse_backend_url,
)

ENV_PREFIX = "GOL7LB_"
CONFIG_ENV = "GOL7LB_CONFIG"
ALGORITHMS = ("round_robin", "random")
HEALTH_TYPES = ("tcp", "http")
CPU_AFFINITY = ("auto", "off")
FORWARDED_MODES = ("x-forwarded", "rfc7239", "both")
DEMO_PORTS = (8081, 8082, 8083)


class ConfigError(Exception):
    """A setting that stops the start; str() is the one line shown to the operator."""


@dataclass(frozen=True)
class Setting:
    section: str  # "" for top-level keys
    key: str
    default: Any
    kind: str  # "str" | "float" | "int" | "list" (of strings; comma-separated in the environment)
    allowed: str  # what the error message says is allowed
    meaning: str
    check: Callable[[Any], bool] = lambda value: True

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key

    @property
    def env(self) -> str:
        parts = [self.section, self.key] if self.section else [self.key]
        return ENV_PREFIX + "_".join(parts).upper()


def _positive(value: float) -> bool:
    return 0 < value <= 86400


def _parses(parser: Callable[[str], Any]) -> Callable[[str], bool]:
    """A setting check that accepts what `parser` accepts (it raises ValueError otherwise)."""
    def check(value: str) -> bool:
        try:
            parser(value)
        except ValueError:
            return False
        return True
    return check


SETTINGS: tuple[Setting, ...] = (
    Setting("", "algorithm", "round_robin", "str", "one of " + ", ".join(ALGORITHMS),
            "How a backend is chosen among the healthy ones (both honour weights).",
            lambda v: v in ALGORITHMS),
    Setting("", "cpu_affinity", "auto", "str", "one of " + ", ".join(CPU_AFFINITY),
            "auto: pin worker i to CPU i mod n of the CPUs the LB may use, so a worker's "
            "threads hand the GIL over on one core (README, Worker class). off: no pinning.",
            lambda v: v in CPU_AFFINITY),
    Setting("health", "type", "tcp", "str", "one of " + ", ".join(HEALTH_TYPES),
            "tcp: a connect succeeds. http: GET `health.path` answers a status in "
            "`health.expect_status`.", lambda v: v in HEALTH_TYPES),
    Setting("health", "interval", 10.0, "float", "a number of seconds > 0",
            "Seconds between two checks of one backend.", _positive),
    Setting("health", "timeout", 2.0, "float", "a number of seconds > 0",
            "Seconds one check may take before it counts as failed.", _positive),
    Setting("health", "rise", 2, "int", "a whole number from 1 to 1000",
            "Consecutive successes that bring a down backend back.", lambda v: 1 <= v <= 1000),
    Setting("health", "fall", 3, "int", "a whole number from 1 to 1000",
            "Consecutive failures that take an up backend out.", lambda v: 1 <= v <= 1000),
    Setting("health", "path", "/healthz", "str", "a path starting with /",
            "Path requested by http checks.",
            lambda v: v.startswith("/") and v.isprintable() and " " not in v),
    Setting("health", "expect_status", "200-399", "str",
            "status codes or ranges like 200-399 or 200,204", "Statuses that pass an http check.",
            _parses(lambda v: parse_status_ranges(v))),
    Setting("proxy", "connect_timeout", 3.0, "float", "a number of seconds > 0",
            "Seconds to open a connection to a backend before trying the next one.", _positive),
    Setting("proxy", "read_timeout", 60.0, "float", "a number of seconds > 0",
            "Seconds a backend may stay silent (before or during its answer); then 504.",
            _positive),
    Setting("proxy", "retries", 2, "int", "a whole number from 0 to 100",
            "Further backends tried when connecting fails, or when a backend drops an "
            "idempotent request without a body before answering.", lambda v: 0 <= v <= 100),
    Setting("admin", "bind", "127.0.0.1:8404", "str", "host:port, or \"\" for off",
            "Admin listener (`/healthz`, `/status`); empty turns it off.",
            _parses(lambda v: parse_bind(v))),
    # The worker that owns the client connection (issue 9).
    Setting("proxy", "client_header_timeout", 10.0, "float", "a number of seconds > 0",
            "Seconds a client has to send a whole request head (from the connection's start, "
            "or from the end of the previous response); then 408 and close.", _positive),
    Setting("proxy", "client_idle_timeout", 60.0, "float", "a number of seconds > 0",
            "Seconds an idle keep-alive client connection (or a silent tunnel) is kept open.",
            _positive),
    Setting("proxy", "max_header_bytes", 16384, "int", "a whole number from 1024 to 1048576",
            "Largest request head (request line and header lines) in bytes; larger: 431.",
            lambda v: 1024 <= v <= 1048576),
    Setting("proxy", "max_headers", 100, "int", "a whole number from 1 to 10000",
            "Most header lines in a request; more: 431.", lambda v: 1 <= v <= 10000),
    Setting("proxy", "forwarded", "x-forwarded", "str", "one of " + ", ".join(FORWARDED_MODES),
            "x-forwarded: set X-Forwarded-For/Proto/Host/Port. rfc7239: append a Forwarded "
            "element instead. both: both.", lambda v: v in FORWARDED_MODES),
    Setting("proxy", "trusted_proxies", (), "list", "a list of CIDRs like 10.0.0.0/8",
            "Addresses whose Forwarded, X-Real-IP and X-Forwarded-Proto/Host/Port are kept; "
            "from anyone else they are removed (comma-separated in the environment).",
            _parses(lambda v: parse_networks(v))),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
BACKENDS_ENV = ENV_PREFIX + "BACKENDS"


@dataclass(frozen=True)
class HealthSettings:
    type: str = "tcp"
    interval: float = 10.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    path: str = "/healthz"
    expect_status: str = "200-399"

    @property
    def status_ranges(self) -> tuple[tuple[int, int], ...]:
        return parse_status_ranges(self.expect_status)


@dataclass(frozen=True)
class ProxySettings:
    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    retries: int = 2
    client_header_timeout: float = 10.0
    client_idle_timeout: float = 60.0
    max_header_bytes: int = 16384
    max_headers: int = 100
    forwarded: str = "x-forwarded"
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdminSettings:
    bind: str = "127.0.0.1:8404"

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_bind(self.bind)


@dataclass(frozen=True)
class Settings:
    algorithm: str = "round_robin"
    cpu_affinity: str = "auto"
    backends: tuple[Backend, ...] = ()
    health: HealthSettings = field(default_factory=HealthSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    demo_backends: bool = False  # True when no backend was configured and the demo ones stand in
    source: str = "defaults"  # where the settings came from, for the start-up log


def parse_status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """'200-399,404' -> ((200, 399), (404, 404)); ValueError on anything else."""
    ranges = []
    for part in str(text).split(","):
        lo_text, sep, hi_text = part.strip().partition("-")
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
        if not 100 <= lo <= hi <= 599:
            raise ValueError(text)
        ranges.append((lo, hi))
    return tuple(ranges)


def parse_networks(items: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """('10.0.0.0/8', '::1') -> networks; ValueError for anything that is not an address/CIDR."""
    if isinstance(items, str) or not isinstance(items, list | tuple):
        raise ValueError(items)
    networks = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(item)
        networks.append(ipaddress.ip_network(item.strip(), strict=False))
    return tuple(networks)


def parse_bind(text: str) -> tuple[str, int] | None:
    """'127.0.0.1:8404' -> ('127.0.0.1', 8404); '' -> None; ValueError otherwise."""
    if text == "":
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(text)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_text)
    if not 1 <= port <= 65535 or any(c.isspace() for c in host):
        raise ValueError(text)
    return host, port


def _bad(setting_name: str, value: Any, origin: str, allowed: str) -> ConfigError:
    return ConfigError(f"invalid setting {setting_name} = {value!r} ({origin}): must be {allowed}")


def _coerce(setting: Setting, value: Any, origin: str, from_env: bool) -> Any:
    """Type-check a TOML value, or convert an environment string, then range-check it."""
    try:
        if setting.kind == "list":
            if from_env:
                result = tuple(p.strip() for p in value.split(",") if p.strip())
            elif isinstance(value, list):
                result = tuple(value)
            else:
                raise TypeError
        elif setting.kind == "str":
            if not isinstance(value, str):
                raise TypeError
            result: Any = value.strip() if from_env else value
        elif setting.kind == "int":
            if from_env:
                result = int(value.strip())
            elif isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            else:
                result = value
        else:
            if from_env:
                result = float(value.strip())
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError
            else:
                result = float(value)
            if result != result:  # NaN
                raise ValueError
    except (TypeError, ValueError):
        raise _bad(setting.name, value, origin, setting.allowed) from None
    if not setting.check(result):
        raise _bad(setting.name, value, origin, setting.allowed)
    return result


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {CONFIG_ENV}={path!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cannot parse {CONFIG_ENV}={path!r}: {e}") from None


def _backends_from_toml(items: Any, origin: str) -> list[Backend]:
    if not isinstance(items, list):
        raise _bad("backends", items, origin, "an array of tables [[backends]] with url and weight")
    backends = []
    for i, item in enumerate(items):
        where = f"backends[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, item, origin, "a table with url and optional weight")
        unknown = set(item) - {"url", "weight"}
        if unknown:
            raise ConfigError(
                f"unknown setting {where}.{sorted(unknown)[0]} ({origin}): allowed are url, weight"
            )
        if "url" not in item:
            raise ConfigError(f"missing setting {where}.url ({origin}): every backend needs a url")
        try:
            weight = check_weight(item.get("weight", 1), str(item["url"]))
            backends.append(parse_backend_url(item["url"], weight))
        except BackendError as e:
            raise ConfigError(f"invalid setting {where} ({origin}): {e}") from None
    return backends


def _values_from_toml(data: Mapping[str, Any], origin: str) -> tuple[dict[str, Any], Any]:
    values: dict[str, Any] = {}
    backends = None
    sections = {s.section for s in SETTINGS if s.section}
    for key, value in data.items():
        if key == "backends":
            backends = _backends_from_toml(value, origin)
        elif key in sections:
            if not isinstance(value, dict):
                raise _bad(key, value, origin, f"a table [{key}]")
            for sub, sub_value in value.items():
                name = f"{key}.{sub}"
                setting = SETTINGS_BY_NAME.get(name)
                if setting is None:
                    allowed = ", ".join(s.key for s in SETTINGS if s.section == key)
                    raise ConfigError(f"unknown setting {name} ({origin}): allowed are {allowed}")
                values[name] = _coerce(setting, sub_value, origin, from_env=False)
        elif key in SETTINGS_BY_NAME:
            values[key] = _coerce(SETTINGS_BY_NAME[key], value, origin, from_env=False)
        else:
            top = [st.key for st in SETTINGS if not st.section]
            allowed = ", ".join(["backends", *sorted(sections), *top])
            raise ConfigError(f"unknown setting {key} ({origin}): allowed are {allowed}")
    return values, backends


def _values_from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], Any]:
    by_env = {s.env: s for s in SETTINGS}
    values: dict[str, Any] = {}
    backends = None
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        origin = f"from {name}"
        if name == BACKENDS_ENV:
            try:
                backends = parse_backend_list(raw)
            except BackendError as e:
                raise ConfigError(f"invalid setting backends ({origin}): {e}") from None
        elif name in by_env:
            values[by_env[name].name] = _coerce(by_env[name], raw, origin, from_env=True)
        else:
            raise ConfigError(
                f"unknown environment variable {name}: allowed are {CONFIG_ENV}, {BACKENDS_ENV}, "
                + ", ".join(by_env)
            )
    return values, backends


def _check_unique(backends: list[Backend], origin: str) -> None:
    seen: set[str] = set()
    for b in backends:
        if b.url in seen:
            raise ConfigError(f"invalid setting backends ({origin}): duplicate backend {b.url}")
        seen.add(b.url)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise ConfigError with one line on the first bad one."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    backends: list[Backend] | None = None
    sources = ["defaults"]

    path = env.get(CONFIG_ENV, "").strip()
    if path:
        origin = f"in {path}"
        file_values, file_backends = _values_from_toml(_read_toml(path), origin)
        values.update(file_values)
        if file_backends is not None:
            _check_unique(file_backends, origin)
            backends = file_backends
        sources.append(path)

    env_values, env_backends = _values_from_env(env)
    values.update(env_values)
    if env_values or env_backends is not None:
        sources.append("environment")
    if env_backends is not None:
        _check_unique(env_backends, f"from {BACKENDS_ENV}")
        backends = env_backends

    demo = not backends
    if demo:
        backends = [parse_backend_url(f"http://127.0.0.1:{port}") for port in DEMO_PORTS]

    def section(name: str) -> dict[str, Any]:
        return {s.key: values[s.name] for s in SETTINGS if s.section == name}

    return Settings(
        algorithm=values["algorithm"],
        cpu_affinity=values["cpu_affinity"],
        backends=tuple(backends),
        health=HealthSettings(**section("health")),
        proxy=ProxySettings(**section("proxy")),
        admin=AdminSettings(**section("admin")),
        demo_backends=demo,
        source=" < ".join(sources),
    )


def env_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    """An integer environment variable for gunicorn itself (PORT, WEB_CONCURRENCY)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ConfigError(
            f"invalid setting {name} = {raw!r}: must be a whole number from {lo} to {hi}")
    return value
