"""Miniature of the paper's Table 3: what the search may skip — MHAs, FFNs, or either.

Rows: for each candidate set (``mha``: EAS; ``ffn``: the FFN of a layer, its PIA placed
before ``wq/wk/wv`` and merged there; ``mha_or_ffn``: one arm per MHA and per FFN) the
bandit searches k = 4, 8 and 12 arms to skip, then fine-tunes the plan; every row is
re-parameterised (``merge``). Harness, schedule and measurements: ``paper_experiments.py``.

``python python/table3_candidates.py`` (about 40 minutes on a 2-core CPU; the MHA rows
are shared with Tables 1 and 5) writes ``runs/paper/table3.json`` and ``table3.png``.
"""

from __future__ import annotations

import sys

from paper_experiments import Method, run_table

NAMES = {"mha": "MHA", "ffn": "FFN", "mha_or_ffn": "MHA or FFN"}
METHODS = [
    Method(f"{NAMES[candidates]}, k={k}", candidates=candidates, k=k)
    for candidates in NAMES
    for k in (4, 8, 12)
]

PAPER = {
    "source": "EAS paper Table 3 (LaVIN-7B, ScienceQA; updated params, s/sample, accuracy)",
    "rows": {
        "MHA, k=4": ["0.08 %", 2.08, 89.44],
        "MHA, k=8": ["0.10 %", 1.92, 89.79],
        "MHA, k=12": ["0.11 %", 1.69, 89.98],
        "FFN, k=4": ["0.08 %", 2.26, 88.30],
        "FFN, k=8": ["0.11 %", 2.18, 84.96],
        "FFN, k=12": ["0.13 %", 2.11, 82.13],
        "MHA or FFN, k=4": ["0.08 %", 2.13, 88.40],
        "MHA or FFN, k=8": ["0.10 %", 2.09, 89.18],
        "MHA or FFN, k=12": ["0.12 %", 1.78, 88.63],
    },
}


def main(argv: list[str] | None = None) -> None:
    run_table(
        "table3",
        "Table 3 (miniature): search candidates MHA / FFN / MHA or FFN",
        METHODS,
        argv,
        PAPER,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
