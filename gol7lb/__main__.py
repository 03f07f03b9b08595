"""`python -m gol7lb check [FILE]`: validate a configuration without starting anything, with
the same one-line errors as the start and the reload (like `nginx -t` or `haproxy -c`).

Exit 0 when it is valid, 2 when it is not (or the command is misused).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from gol7lb.config import CONFIG_ENV, ConfigError, env_int, load_settings
from gol7lb.tls import TLSServer

USAGE = "usage: python -m gol7lb check [FILE]   (FILE defaults to $GOL7LB_CONFIG)"


def check(path: str | None) -> int:
    env = dict(os.environ)
    if path is not None:
        env[CONFIG_ENV] = path
    try:
        settings = load_settings(env)
        if settings.tls.enabled:  # the certificate files load, as at start
            TLSServer.from_settings(settings)
        env_int(env, "PORT", 8080, 1, 65535)
        env_int(env, "WEB_CONCURRENCY", 1, 1, 512)
    except ConfigError as e:
        print(f"gol7lb: {e}", file=sys.stderr)
        return 2
    pools = settings.pools
    backends = sum(len(p.backends) for p in pools.values())
    demo = " (the demo backends: none configured)" if settings.demo_backends else ""
    print(f"gol7lb: configuration OK: {backends} backends{demo} in {len(pools)} pools, "
          f"settings from {settings.source}")
    return 0


def main(argv: Sequence[str]) -> int:
    if len(argv) in (1, 2) and argv[0] == "check":
        return check(argv[1] if len(argv) == 2 else None)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
