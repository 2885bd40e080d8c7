"""Miniature of the paper's Table 5: how many MHAs to skip (k = 4, 8, 12, 16).

Rows: LaVIN-style (rank-8 adapters before every MHA, eager) and EAS with the bandit
searching k MHAs, re-parameterised (``merge``). Harness, schedule and measurements:
``paper_experiments.py``; EAS-4/8/12 are shared with Tables 1 and 3.

``python python/table5_skip_number.py`` (about 20 minutes on a 2-core CPU, 5 when
Table 1 ran first) writes ``runs/paper/table5.json`` and ``table5.png``.
"""

from __future__ import annotations

import sys

from paper_experiments import Method, run_table

METHODS = [
    Method("LaVIN-style", mode="eager"),
    *(Method(f"EAS-{k}", candidates="mha", k=k) for k in (4, 8, 12, 16)),
]

PAPER = {
    "source": "EAS paper Table 5 (LaVIN-7B, ScienceQA; updated params, s/sample, accuracy)",
    "rows": {
        "LaVIN-7B": ["0.06 %", 3.70, 89.41],
        "EAS-7B-4": ["0.08 %", 2.08, 89.44],
        "EAS-7B-8": ["0.10 %", 1.92, 89.79],
        "EAS-7B-12": ["0.11 %", 1.69, 89.98],
        "EAS-7B-16": ["0.13 %", 1.56, 88.42],
    },
}


def main(argv: list[str] | None = None) -> None:
    run_table("table5", "Table 5 (miniature): number of skipped MHAs", METHODS, argv, PAPER)


if __name__ == "__main__":
    main(sys.argv[1:])
