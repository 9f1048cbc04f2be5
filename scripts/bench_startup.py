"""How long the command line takes to answer, against a bare Python start in the same run.

    python scripts/bench_startup.py [--runs 7]

Each command runs in a fresh interpreter (after one untimed warm-up run, so the OS
file cache is warm); medians are reported, and the overhead is the median minus
`python -c pass`'s.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "python -m sbir_core --help": [sys.executable, "-m", "sbir_core", "--help"],
    "python -m sbir_core search --help": [sys.executable, "-m", "sbir_core", "search", "--help"],
    "python -m sbir_core gallery list": [sys.executable, "-m", "sbir_core", "gallery", "list"],
}


def median_seconds(cmd: list[str], runs: int) -> float:
    subprocess.run(cmd, capture_output=True, check=True)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    res = {name: median_seconds(cmd, args.runs) for name, cmd in COMMANDS.items()}
    base = res["python -c pass (baseline)"]
    print(f"medians of {args.runs} runs\n| command | seconds | over bare python |\n|---|---|---|")
    for name, t in res.items():
        print(f"| `{name}` | {t:.3f} | {t - base:+.3f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
