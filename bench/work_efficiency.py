"""Density and work efficiency of the Sparse Transformer patterns, natural order vs the plan.

Work efficiency = useful entries / entries inside the blocks a kernel visits. Natural order
visits the pattern's own layout; "plan" is what the kernels run (effattn.decompose: strided and
fixed split into dense parts merged by log-sum-exp). No timing: a property of the layouts.

Run: python bench/work_efficiency.py [--n 4096 16384] [--blocks 64 128]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effattn import patterns  # noqa: E402
from effattn.decompose import planned_work_efficiency  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args()
    print("| pattern | n | block | density | natural order | plan |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p in (patterns.strided(128), patterns.fixed(128, 16), patterns.fixed(128, 32)):
        for n in args.n:
            for b in args.blocks:
                natural = p.natural_work_efficiency(n, n, b, b)
                planned = planned_work_efficiency(p, n, n, b, b)
                print(
                    f"| {p.name} | {n} | {b} | {p.density(n):.4f} | {natural:.3f} | {planned:.3f} |"
                )


if __name__ == "__main__":
    main()
