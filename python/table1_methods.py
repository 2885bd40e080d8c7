"""Miniature of the paper's Table 1: LaVIN-style vs DAS vs EAS at k = 4 / 8 / 12.

Rows (each tunes a fresh copy of the frozen SmolLM2-135M multimodal model on easy-vqa;
harness, schedule and measurements: ``paper_experiments.py``):

* **LaVIN-style** — a rank-8 router adapter before every MHA, nothing skipped, adapters
  kept at inference (eager);
* **DAS-4** — the bandit searches 4 whole layers to skip; each is replaced by a rank-32
  router adapter ``x + A(attention_norm(x))`` that stays at inference (EAS_SPEC §6);
* **EAS-4 / 8 / 12** — the bandit searches k MHAs to skip; each is replaced by a rank-32
  PIA and every kept MHA gets a rank-8 adapter, all re-parameterised after the prefill
  (``merge``);
* **EAS-8, fixed deep plan** — the reference for the search: MHAs 21–28 skipped (the
  deep window the paper's Fig. 6 and its released fine-tuning scripts point to), trained
  as a fixed plan for 4 epochs like LaVIN-style;
* **EAS-8 plan, 4 fine-tune epochs** — a diagnostic: the skip set EAS-8 searched, trained
  as a fixed plan for 4 epochs like LaVIN-style (EAS-8 itself fine-tunes its plan for 2
  epochs after 2 epochs of warm-up and search), which separates the plan's quality from
  the fine-tuning budget.

``python python/table1_methods.py`` (about 25 minutes on a 2-core CPU, fewer when
other tables have already tuned the EAS rows) writes ``runs/paper/table1.json`` and
``table1.png``.
"""

from __future__ import annotations

import sys

from paper_experiments import Method, run_table

METHODS = [
    Method("LaVIN-style", mode="eager"),
    Method("DAS-4", candidates="block", k=4, mode="eager"),
    *(Method(f"EAS-{k}", candidates="mha", k=k) for k in (4, 8, 12)),
    Method("EAS-8, fixed deep plan", skipped=tuple(range(21, 29))),
    Method("EAS-8 plan, 4 fine-tune epochs", plan_from="EAS-8"),
]

PAPER = {
    "source": "EAS paper Table 1 / EAS_SPEC §7 (LaVIN-7B, ScienceQA, one A100, batch 1)",
    "rows": {
        "LaVIN-7B": {"updated_params": "0.06 %", "s_per_sample": 3.70, "accuracy": 89.41},
        "DAS-7B (4 layers)": {"updated_params": "0.07 %", "s_per_sample": 3.23, "accuracy": 89.15},
        "EAS-7B-4": {"updated_params": "0.08 %", "s_per_sample": 2.08, "accuracy": 89.44},
        "EAS-7B-8": {"updated_params": "0.10 %", "s_per_sample": 1.92, "accuracy": 89.79},
        "EAS-7B-12": {"updated_params": "0.11 %", "s_per_sample": 1.69, "accuracy": 89.98},
    },
}


def main(argv: list[str] | None = None) -> None:
    run_table(
        "table1", "Table 1 (miniature): LaVIN-style, DAS and EAS on easy-vqa", METHODS, argv, PAPER
    )


if __name__ == "__main__":
    main(sys.argv[1:])
