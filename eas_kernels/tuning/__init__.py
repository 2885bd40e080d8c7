"""Tuning EAS end to end: the schedule, its data, evaluation and plots (EAS_SPEC §5).

* :mod:`.trainer`  — :class:`EASTuner` and :class:`TuningConfig`: warm-up → search →
  fine-tune on any patched model, with checkpoints and resume (:class:`TuningInterrupted`
  when Ctrl-C stopped it at a step's end);
* :mod:`.data`     — examples and left-padded batches;
* :mod:`.evaluate` — accuracy (greedy, batch 1) and decode speed, the floor model;
* :mod:`.plots`    — preferences over time and the final plan (PNG).

The demo's workload (easy-vqa, the multimodal model) is :mod:`eas_kernels.demo`.
"""

from .data import Batch, Example, collate
from .trainer import EASTuner, TuningConfig, TuningInterrupted, TuningResult, answer_loss

__all__ = [
    "Batch",
    "EASTuner",
    "Example",
    "TuningConfig",
    "TuningInterrupted",
    "TuningResult",
    "answer_loss",
    "collate",
]
