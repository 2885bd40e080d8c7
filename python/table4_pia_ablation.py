"""Miniature of the paper's Table 4: the designs of the PIA, added one at a time.

All rows skip the same 8 MHAs — layers 21–28 of SmolLM2's 30, the deep MHAs the paper's
Fig. 6 finds redundant (fixed, so that only the PIA differs) — and train 4 epochs:

* **Base** — one down path (``SkipPlan(token_mixing=False)``: ``c = b_d1``), the router
  following the running mean of the tokens so far (``state="running"``), eager;
* **+ token averaging** — the second, token-averaged down path ``f_d2`` (Eq. 4), still
  with running states: token t's state averages tokens 1..t, updated every decode step;
* **+ frozen state** — the state computed over the prompt at the prefill and frozen
  (EAS_SPEC §3), still applied eagerly;
* **+ re-parameterisation** — the same tuned model, its PIAs merged into ``W1/W3`` (and the
  kept layers' adapters into ``wq/wk/wv``) after the prefill.

Harness and measurements: ``paper_experiments.py``. ``python python/table4_pia_ablation.py``
(about 15 minutes on a 2-core CPU) writes ``runs/paper/table4.json`` and ``table4.png``.
"""

from __future__ import annotations

import sys

from paper_experiments import Method, run_table

DEEP = tuple(range(21, 29))
METHODS = [
    Method(
        "Base (one down path)",
        skipped=DEEP,
        plan_options=(("token_mixing", False), ("state", "running")),
        mode="eager",
    ),
    Method("+ token averaging", skipped=DEEP, plan_options=(("state", "running"),), mode="eager"),
    Method("+ frozen state", skipped=DEEP, mode="eager"),
    Method("+ re-parameterisation", skipped=DEEP, mode="merge"),
]

PAPER = {
    "source": "EAS paper Table 4 (EAS-7B, 12 MHAs skipped, ScienceQA; params, s/sample, acc)",
    "rows": {
        "Base": ["0.09 %", 2.94, 87.08],
        "+ information exchange in Eq. 4": ["0.11 %", 3.23, 90.05],
        "+ frozen bias term in Eq. 11": ["0.11 %", 2.97, 89.98],
        "+ re-parameterization": ["0.11 %", 1.69, 89.98],
    },
}


def main(argv: list[str] | None = None) -> None:
    run_table(
        "table4", "Table 4 (miniature): PIA ablation, MHAs 21-28 skipped", METHODS, argv, PAPER
    )


if __name__ == "__main__":
    main(sys.argv[1:])
