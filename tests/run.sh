#!/usr/bin/env bash
# The project's test command (CI runs it through .ci/run): install what the tests need,
# then run pytest with any arguments given, e.g. `bash tests/run.sh -q tests/test_backend.py`.
# Works on a fresh machine as root, with no standard input.
set -euo pipefail
cd "$(dirname "$0")/.."

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# The runtime dependencies at the versions requirements.lock pins (what the image installs),
# so the tests run against what ships (tests/test_packaging.py checks it).
python -m pip install -q -c requirements.lock -e '.[test]'

# Debian packages the tests need, installed only when missing (one `apt-get update` for all):
# * docker-compose (1.x), the compose validator for tests/test_packaging.py: its `config`
#   command validates docker-compose.yml without a Docker engine;
# * chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver), the headless
#   browser tests/test_dashboard.py drives with Selenium; never a downloaded browser build;
# * prometheus, for its promtool: tests/test_metrics.py runs `promtool check metrics` on the
#   admin listener's /metrics (only the checker is used; the tests never start the server);
# * pebble, Let's Encrypt's ACME test server: tests/test_acme.py gets certificates from it;
# * redis-server, the real Redis that tests/test_rate_limits.py starts on a free port (and
#   stops by PID) for the rate limits shared by several instances;
# * curl and openssl: tests/test_tls.py's HTTPS clients besides Python's (s_client).
# --no-install-recommends keeps the Docker engine (docker.io, recommended) off the machine.
apt_packages=()
command -v docker-compose >/dev/null 2>&1 || apt_packages+=(docker-compose)
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    apt_packages+=(chromium chromium-driver)
fi
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
command -v pebble >/dev/null 2>&1 || apt_packages+=(pebble)
command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
command -v curl >/dev/null 2>&1 || apt_packages+=(curl)
command -v openssl >/dev/null 2>&1 || apt_packages+=(openssl)
if [ "${#apt_packages[@]}" -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo -n)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${apt_packages[@]}"
fi

# Three test processes (pytest-xdist; the suite mostly waits on real processes, so three keep
# two cores busy), one test file each at a time, so a module's shared LB and
# the fixed demo ports stay in one process; `-n 0` in the arguments runs everything in this one.
exec python -m pytest -n "${GOL7LB_TEST_PROCESSES:-3}" --dist loadfile "$@"
