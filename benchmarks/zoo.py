"""Zoo coverage: the `lnconvert zoo` runner, then the coverage summary of its CSV.

    python benchmarks/zoo.py --torchvision --timeout 300 --out zoo-report
    python benchmarks/zoo.py --timm-families --timeout 180 --out zoo-timm
    python benchmarks/zoo.py resnet18 timm/resnet18d --out zoo-small

Arguments are those of `lnconvert zoo` (see `lnconvert zoo --help`); rows already in the CSV
are kept (resumed). Prints, per library: models, exact / partial / failed, median and max
conversion seconds (tracing, passes and verification), all from the same run's CSV.
"""
from __future__ import annotations

import sys

from lnconvert.cli import app
from lnconvert.zoo import coverage, read_rows


def main(argv: list[str]) -> None:
    prefix = argv[argv.index("--out") + 1] if "--out" in argv else "zoo-report"
    try:
        app(["zoo", *argv], standalone_mode=False)
    except SystemExit as exit_:  # a usage error was already printed
        if exit_.code:
            raise
    print(f"{'library':12} {'models':>6} {'exact':>6} {'partial':>7} {'failed':>6} {'median s':>9} {'max s':>7}")
    for library, c in coverage(read_rows(f"{prefix}.csv")).items():
        median, slowest = (f"{c[k]:.2f}" if c[k] is not None else "-" for k in ("median_s", "max_s"))
        print(f"{library:12} {c['models']:>6} {c['exact']:>6} {c['partial']:>7} {c['failed']:>6} {median:>9} "
              f"{slowest:>7}")


if __name__ == "__main__":
    main(sys.argv[1:])
