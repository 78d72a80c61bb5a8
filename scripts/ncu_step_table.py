#!/usr/bin/env python3
"""Where a GPU step's time goes, from Nsight Compute's per-kernel summary.

    ncu --metrics gpu__time_duration.sum --print-summary per-kernel \\
        tandem gpu bench --batches 16 --steps 2 --enforce-eager ... > ncu.txt
    scripts/ncu_step_table.py ncu.txt --layers 32 [--per-layer-calls N]

Each kernel's summary block (name, grid, block, "Invocations N", then the
`gpu__time_duration.sum` line's unit, min, max and average) becomes a row. Without
--per-layer-calls the script lists every kernel by total time and the invocation counts
that are multiples of --layers (the candidates for one layer's kernels). With it, the
kernels run k·N times in all (k calls a layer, over N / layers steps; up to one more
call a step, such as the final norm's, is allowed) are taken as one layer's work, and
the table gives each one's microseconds per layer, their sum, and that sum times the
layers: one step's time in those kernels.
"""

import argparse
import re
import sys

HEADER = re.compile(
    r"^\s+(?P<name>\S.*?) \((?P<grid>[\d, ]+)\)x\((?P<block>[\d, ]+)\),.*Invocations (?P<calls>\d+)"
)
DURATION = re.compile(
    r"^\s+gpu__time_duration\.sum\s+(?P<unit>\S+)\s+(?P<min>[\d.,]+)\s+(?P<max>[\d.,]+)\s+(?P<avg>[\d.,]+)"
)
MICROSECONDS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def kernels(lines):
    """(name, grid, block, invocations, average µs) for every summary block."""
    current = None
    for line in lines:
        header = HEADER.match(line)
        if header:
            current = header
            continue
        duration = DURATION.match(line)
        if duration and current:
            unit = duration["unit"]
            if unit not in MICROSECONDS:
                sys.exit(f"unknown time unit {unit!r} in: {line.strip()}")
            average = float(duration["avg"].replace(",", "")) * MICROSECONDS[unit]
            yield (current["name"], current["grid"], current["block"], int(current["calls"]), average)
            current = None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ncu_output")
    parser.add_argument("--layers", type=int, required=True, help="the model's layers")
    parser.add_argument(
        "--per-layer-calls",
        type=int,
        help="invocations of a once-a-layer kernel in the whole run (a multiple of --layers)",
    )
    args = parser.parse_args()
    with open(args.ncu_output, encoding="utf-8", errors="replace") as f:
        rows = list(kernels(f))
    if not rows:
        sys.exit("no per-kernel summary with gpu__time_duration.sum found (ncu --print-summary per-kernel)")
    if args.per_layer_calls is None:
        print("| kernel | grid | block | invocations | average µs | total µs |")
        print("|---|---|---|---|---|---|")
        for name, grid, block, calls, average in sorted(rows, key=lambda r: -r[3] * r[4]):
            print(f"| {short(name)} | ({grid}) | ({block}) | {calls} | {average:.2f} | {calls * average:.1f} |")
        counts = sorted({r[3] for r in rows if r[3] % args.layers == 0}, reverse=True)
        print(f"\ninvocation counts that are multiples of {args.layers}: {counts}")
        return
    n = args.per_layer_calls
    if n % args.layers:
        sys.exit(f"--per-layer-calls {n} is not a multiple of --layers {args.layers}")
    steps = n // args.layers
    layer = [r for r in rows if r[3] >= n and r[3] % n <= steps]
    if not layer:
        sys.exit(f"no kernel ran a multiple of {n} times")
    print("| kernel | grid | calls a layer | µs a layer |")
    print("|---|---|---|---|")
    total = 0.0
    for name, grid, _, calls, average in sorted(layer, key=lambda r: -(r[3] // n) * r[4]):
        per_layer = average * (calls // n)
        total += per_layer
        print(f"| {short(name)} | ({grid}) | {calls // n} | {per_layer:.2f} |")
    print(f"| **a layer** | | | **{total:.1f}** |")
    print(f"\n{args.layers} layers: {total * args.layers / 1e3:.3f} ms a step in these kernels")


def short(name):
    """A kernel's name without its return type and template arguments."""
    name = name.removeprefix("void ")
    return name.split("<", 1)[0] if "<" in name else name

if __name__ == "__main__":
    main()
