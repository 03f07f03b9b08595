#!/usr/bin/env bash
# Install what benchmarks/run.py needs, only when missing. Idempotent.
#   Debian: wrk, haproxy, nginx        PyPI: benchmarks/requirements.txt
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

missing=()
for tool in wrk haproxy nginx; do
    # nginx and haproxy live in /usr/sbin, which is not always on a user's PATH.
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        missing+=("$tool")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    echo "setup.sh: installing Debian packages: ${missing[*]}"
    # The packages must not start system-wide services (nginx on port 80): the benchmark
    # runs its own instances. Keep an existing policy-rc.d, otherwise add one for this install.
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    cleanup() {
        if [ -n "$made_policy" ]; then
            $sudo rm -f /usr/sbin/policy-rc.d
        fi
    }
    trap cleanup EXIT
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
    echo "setup.sh: wrk, haproxy and nginx are installed"
fi

if "$python" - "$here/requirements.txt" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

names = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        names.append(line)
missing = []
for name in names:
    try:
        version(name)
    except PackageNotFoundError:
        missing.append(name)
if missing:
    print("setup.sh: missing Python packages:", " ".join(missing))
    sys.exit(1)
PY
then
    echo "setup.sh: Python packages from requirements.txt are installed"
else
    "$python" -m pip install -q -r "$here/requirements.txt"
fi
