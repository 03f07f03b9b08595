"""CPU cost of response compression (`[compression]`), measured on the real encoders.

Run: python benchmarks/compress_cost.py [--mb 4]

For each `compression.level` and encoding: CPU milliseconds per MB of answer (and MB/s on
one core) when the backend sends the answer whole, and when it streams it in 64 KiB and
4 KiB blocks (each flushed, as compress.py does); the compressed size; and the fixed cost
per answer (negotiation, the head rewrite and the encoder) on a 2 KiB answer. The input is
JSON made from seeded random records (compresses about like a real API's answers).
docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

from gol7lb.compress import ENCODERS, LEVELS, Compression
from gol7lb.config import CompressionSettings


def sample(size: int) -> bytes:
    """About `size` bytes of JSON records: ids, names, words, numbers, timestamps."""
    rng = random.Random(7)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
             "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]
    records = []
    total = 0
    while total < size:
        record = {"id": rng.randrange(10**9), "name": f"user-{rng.randrange(10**6)}",
                  "tags": rng.sample(words, 3), "score": round(rng.random() * 100, 3),
                  "active": rng.random() < 0.5, "created": 1_700_000_000 + rng.randrange(10**7),
                  "note": " ".join(rng.choice(words) for _ in range(rng.randrange(3, 12)))}
        text = json.dumps(record)
        records.append(text)
        total += len(text) + 2
    return ("[" + ",\n".join(records) + "]").encode()[:size]


def cpu_seconds(fn: Callable[[], object], rounds: int = 3) -> float:
    """Best CPU time (this thread) of `rounds` calls."""
    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        fn()
        best = min(best, time.thread_time() - started)
    return best


def streamed(encoding: str, level: int, data: bytes, block: int) -> int:
    encoder = ENCODERS[encoding](level)
    size = 0
    for i in range(0, len(data), block):
        size += len(encoder.chunk(data[i:i + block]))
    return size + len(encoder.end())


def per_answer(level: str, encoding: str, data: bytes, count: int = 2000) -> float:
    """Microseconds of CPU per small answer: negotiate, apply (head rewrite, encoder), whole."""
    compression = Compression(CompressionSettings(encodings=(encoding,), level=level))  # type: ignore[arg-type]
    environ = {"HTTP_ACCEPT_ENCODING": "gzip, deflate, br, zstd"}
    head = [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
            ("ETag", '"abc"')]

    def run() -> None:
        for _ in range(count):
            negotiated = compression.negotiate(environ, "GET")
            assert negotiated is not None
            encoder = negotiated.apply(200, list(head), len(data))
            assert encoder is not None
            encoder.whole(data)
    return cpu_seconds(run) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=4.0, help="MB of input per measurement")
    args = parser.parse_args()
    data = sample(int(args.mb * 1_000_000))
    small = sample(2048)
    mb = len(data) / 1_000_000
    print(f"input: {mb:.1f} MB of JSON; CPU ms per MB (MB/s on one core); size: compressed/"
          "original\n")
    print("| level | encoding | whole | streamed, 64 KiB blocks | streamed, 4 KiB blocks | "
          "size (whole) | size (4 KiB blocks) | per 2 KiB answer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for level, levels in LEVELS.items():
        for encoding, number in levels.items():
            whole_size = len(ENCODERS[encoding](number).whole(data))
            whole = cpu_seconds(lambda e=encoding, n=number: ENCODERS[e](n).whole(data))
            big = cpu_seconds(lambda e=encoding, n=number: streamed(e, n, data, 65536))
            tiny = cpu_seconds(lambda e=encoding, n=number: streamed(e, n, data, 4096))
            tiny_size = streamed(encoding, number, data, 4096)
            cells = [f"{s / mb * 1000:.1f} ms ({mb / s:.0f} MB/s)" for s in (whole, big, tiny)]
            print(f"| {level} | {encoding} {number} | " + " | ".join(cells)
                  + f" | {whole_size / len(data):.3f} | {tiny_size / len(data):.3f} | "
                  f"{per_answer(level, encoding, small):.0f} us |")


if __name__ == "__main__":
    main()
