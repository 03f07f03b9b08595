"""Run defparam/smuggler's mutations against a real GoL7-LB (not part of the pytest run).

    git clone https://github.com/defparam/smuggler /tmp/smuggler
    python tests/manual/run_smuggler.py /tmp/smuggler

Starts an LB (its own worker, free ports) in front of tests/recorder.py's backend, runs
smuggler's default and exhaustive configurations, and prints its verdicts and what reached the
backend. The refused cases are kept as our own corpus in tests/smuggling.py.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.procs import LB  # noqa: E402
from tests.recorder import Recorder  # noqa: E402


def main(smuggler_dir: str) -> int:
    recorder = Recorder()
    log = Path("/tmp") / "gol7lb-smuggler-lb.log"
    lb = LB({"GOL7LB_BACKENDS": f"http://127.0.0.1:{recorder.port}",
             "GOL7LB_PROXY_CLIENT_HEADER_TIMEOUT": "3"}, log=log).wait_ready()
    findings = 0
    try:
        for config in ("default.py", "exhaustive.py"):
            recorder.clear()
            out = subprocess.run([sys.executable, "smuggler.py", "-u", f"{lb.url}/", "-c", config,
                                  "--no-color", "-t", "2"], cwd=smuggler_dir,
                                 capture_output=True, text=True, timeout=1800).stdout
            verdicts = collections.Counter(line.split(": ", 1)[-1][:40]
                                           for line in out.splitlines() if "OK (" in line)
            found = [line for line in out.splitlines() if "Issue Found" in line]
            findings += len(found)
            print(f"{config}: {sum(verdicts.values())} mutations, {len(found)} findings")
            for verdict, n in verdicts.most_common():
                print(f"  {n:5}  {verdict}")
            data = recorder.data()
            print(f"  reached the backend: {data.count(b' HTTP/1.1' + bytes([13, 10]))} requests")
    finally:
        lb.stop()
        recorder.close()
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
