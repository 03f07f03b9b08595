"""docs/settings.md, the settings reference, generated from the declarations in config.py.

    python -m gol7lb.docs > docs/settings.md

tests/test_config.py fails when the file and this output differ. The scalar settings come
from `SETTINGS` (name, variable, default, meaning, allowed values); the tables of the file
(`[[backends]]`, `[pools.NAME]`, `[[routes]]`) are described here, key by key, and every key
the parsers in pools.py accept must be described.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from gol7lb.config import BACKENDS_ENV, CONFIG_ENV, POOL_DEFAULTS, SETTINGS, SETTINGS_BY_NAME
from gol7lb.pools import BACKEND_KEYS, MAX_CONNECTIONS, POOL_KEYS, ROUTE_KEYS
from gol7lb.ratelimit import MAX_LOCAL_LIMITS, MAX_RATE, RATE_LIMIT_KEYS

COMMAND = "python -m gol7lb.docs > docs/settings.md"

INTRO = f"""\
# Settings reference

<!-- Generated from gol7lb/config.py by `{COMMAND}`.
Edit the declarations there, not this file: tests/test_config.py fails when they differ. -->

Defaults < TOML file (`{CONFIG_ENV}`, a path, read with `tomllib`) < environment. A bad
value stops the start with one line naming the setting, the value and what is allowed, and
exit status 2; so do unknown keys and unknown `GOL7LB_*` variables (typos are not ignored).
`python -m gol7lb check [FILE]` validates a file without starting anything.

Every setting below has an environment variable: `GOL7LB_<SECTION>_<KEY>` (top-level keys:
`GOL7LB_<KEY>`), upper case. Lists take a comma-separated value in the environment;
booleans take `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
"""

BACKENDS_ROW = (
    f"| `backends` | `{BACKENDS_ENV}` | demo backends | The default pool: `[[backends]]` "
    "tables (see below), or in the environment a comma-separated list `URL [weight=N], ...` "
    "that replaces the file's. Duplicates are refused; set but empty is an error. With no "
    "backend anywhere the LB starts three demo backends on 127.0.0.1:8081-8083. |")

BACKEND_DOCS = {
    "url": "`http://host:port` or `https://host:port` (TLS, verified against `host`; port "
           "443 by default), nothing else (no path, no user). Required, except for "
           '`discover = "srv"` (which is http:// only); with `discover = "dns"`, an https:// '
           "URL verifies every address found against the name.",
    "weight": "1-256 (default 1): the backend's share under every policy.",
    "max_connections": f"0-{MAX_CONNECTIONS}: in-flight cap for this backend over all "
                       "workers; 0 (default): `proxy.max_connections`.",
    "discover": '`"dns"`: every A/AAAA address of the URL\'s host, on its port. `"srv"` '
                "(with `name`, without `url` and `weight`): the SRV records' targets, ports "
                "and weights. Resolved again each `discovery.interval`.",
    "name": 'With `discover = "srv"` only: an SRV name like `"_http._tcp.api.internal"`.',
}

ROUTE_DOCS = {
    "host": "Exact (`api.example.com`) or `*.example.com` (any subdomain at any depth, never "
            "the bare domain); port, case and a trailing dot ignored.",
    "path_prefix": "Segment-aware: `/api/` matches `/api/x`; `/api` matches `/api` and "
                   "`/api/x`, not `/apix`. Matched against the normalised path.",
    "methods": 'Any of these methods, like `["GET", "POST"]`.',
    "headers": 'Every listed header has exactly this value, like `{ "X-Canary" = "1" }`.',
    "pool": "Where matching requests go (a `[pools.NAME]`, or `default`). Required, except "
            "with `split`, `redirect` or `respond` (then left out).",
    "strip_prefix": "`true` (with `path_prefix`): `/api/x?q=1` reaches the pool as `/x?q=1`, "
                    "`/api` as `/`. Default `false`.",
    "compress": "`true`: answers are compressed as `[compression]` says (zstd, br or gzip "
                "by the client's `Accept-Encoding`). Default `false`.",
    "mirror": '`{ pool = "shadow", percent = 10 }`: a copy of that share of the requests '
              "(percent 0-100, default 100; bodies up to `proxy.retry_buffer`) goes to the "
              "pool off the request path; its answers are discarded.",
    # route rules (gol7lb/rules.py), applied in this order; examples in docs/configuration.md
    "allow": 'CIDRs or addresses like `["10.0.0.0/8"]`: only these clients (the address after '
             "`proxy.trusted_proxies`) pass; others get `403`.",
    "deny": "CIDRs or addresses refused with `403`; checked before `allow`.",
    "basic_auth": '`{ realm = "ops", users = { alice = "$2b$12$..." } }`: bcrypt hashes only '
                  "(`htpasswd -nbBC 12 alice PW`); `401` with `WWW-Authenticate` otherwise.",
    "redirect": '`{ to = "https://example.com{uri}", status = 308 }`: placeholders `{scheme}` '
                "`{host}` `{path}` `{path_rest}` `{query}` `{uri}`; status 301, 302 (default), "
                "303, 307 or 308. No backend.",
    "respond": '`{ status = 200, body = "pong\\n", content_type = "text/plain" }`: the LB '
               "answers itself. No backend.",
    "rewrite": '`{ path_regex = "^/v1/(.*)$", replace = "/v2/\\\\1" }`: the path (after '
               "`strip_prefix`) through an RE2 pattern (linear time); every match replaced.",
    "request_headers": '`{ set = { "X-Env" = "prod" }, add = {}, remove = ["X-Debug"] }` on the '
                       "request sent to the backend.",
    "response_headers": "`set`, `add`, `remove` as `request_headers`, on the answer to the "
                        "client (the backend's, and the LB's errors after the pick).",
    "split": '`[ { pool = "v1", weight = 90 }, { pool = "v2", weight = 10 } ]` instead of '
             "`pool`: whole-number weights adding up to 100, interleaved (exact per 100 "
             "requests of each worker).",
    "rate_limit": "The name of a `[rate_limits.NAME]`: requests on this route over its "
                  "budget get `429`. An unknown name is refused.",
}

RATE_LIMIT_DOCS = {
    "key": "What one budget counts: `client_ip` (default; the connection's peer, or the "
           "PROXY protocol's source), `header:NAME` (each value its own budget; a request "
           "without it counts by its address), `path` (the normalised path), `route` (one "
           "budget per route that names the limit).",
    "rate": f"Required: requests per `per` seconds, the bucket's refill (> 0, up to "
            f"{MAX_RATE}).",
    "per": "Seconds (default 1).",
    "burst": "The bucket's size, most requests at once (default: `rate` rounded up).",
    "store": '`"local"` (default): one budget for all workers of this instance (N instances '
             'let N x `rate` through). `"redis://host:6379/0"`: one budget for every instance '
             f"naming that server. At most {MAX_LOCAL_LIMITS} local limits.",
    "on_store_error": "`allow` (default) or `deny` (`429`): what happens while the Redis "
                      "store cannot be reached (logged once, counted).",
}


def toml_value(value: Any) -> str:
    """A default as it is written in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def key_table(title: str, keys: Sequence[str], docs: Mapping[str, str]) -> list[str]:
    missing = sorted(set(keys) ^ set(docs))
    if missing:
        raise AssertionError(f"gol7lb/docs.py: describe exactly the keys of {title}: {missing}")
    return ["| key | meaning |", "| --- | --- |",
            *(f"| `{key}` | {cell(docs[key])} |" for key in keys)]


def pool_docs() -> dict[str, str]:
    docs = {"backends": "`[[pools.NAME.backends]]` tables, as `[[backends]]`; at least one.",
            "send_proxy_protocol": "As `proxy.send_proxy_protocol`, for this pool's backends "
            "(the proxy-level one is the default pool's only): \"\", \"v1\" or \"v2\". "
            "Default `\"\"`."}
    for key in POOL_KEYS:
        if key in SETTINGS_BY_NAME:
            setting = SETTINGS_BY_NAME[key]
            docs[key] = (f"As the top-level `{key}`, for this pool: {setting.allowed}. "
                         f"Default `{toml_value(POOL_DEFAULTS[key])}`.")
    return docs


def settings_markdown() -> str:
    lines = [INTRO]
    sections = dict.fromkeys(s.section for s in SETTINGS)
    for section in sections:
        lines.append(f"## `[{section}]`\n" if section else "## Top level\n")
        lines += ["| setting | environment | default | meaning |", "| --- | --- | --- | --- |"]
        if not section:
            lines.append(BACKENDS_ROW)
        for s in (s for s in SETTINGS if s.section == section):
            lines.append(f"| `{s.name}` | `{s.env}` | `{toml_value(s.default)}` | "
                         f"{cell(s.meaning)} Allowed: {cell(s.allowed)}. |")
        lines.append("")
    lines += ["## `[[backends]]` and `[[pools.NAME.backends]]`\n",
              "One table per backend of the default pool, or of a named pool.\n",
              *key_table("[[backends]]", BACKEND_KEYS, BACKEND_DOCS), "",
              "## `[pools.NAME]`\n",
              "Named pools, each with its own backends and policy. A name is letters, digits, "
              "`_`, `.` and `-` (up to 64), and not `default` (the `[[backends]]` list).\n",
              *key_table("[pools.NAME]", POOL_KEYS, pool_docs()), "",
              "## `[[routes]]`\n",
              "Tried in file order; the first match wins. A request no route matches goes to "
              "the default pool, or gets `404` when there is none. Conditions left out match "
              "every request.\n",
              *key_table("[[routes]]", ROUTE_KEYS, ROUTE_DOCS), "",
              "Route rules run in this order: access (`deny`, `allow`, `basic_auth`), "
              "`rate_limit`, `redirect` or `respond`, `rewrite`, `request_headers`, the pick "
              "(`pool` or `split`), `mirror`, `response_headers`, `compress`. The same keys "
              "except `split` on the top level apply to requests that match no route. Values "
              "that would put CR, LF or NUL into a header or a redirect are refused at load.\n",
              "## `[rate_limits.NAME]`\n",
              "Token buckets a route names with `rate_limit` (the top-level `rate_limit`: "
              "requests that match no route). A name is letters, digits, `_`, `.` and `-` (up "
              "to 64). See [Rate limits](configuration.md#rate-limits).\n",
              *key_table("[rate_limits.NAME]", RATE_LIMIT_KEYS, RATE_LIMIT_DOCS)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_markdown())
