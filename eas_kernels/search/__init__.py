"""Redundancy search (EAS_SPEC §5): which MHAs (or FFNs, or blocks) a task does not need.

* :mod:`.estimator` — the interface (:class:`Estimator`, :class:`Measurement`), the
  registry :data:`ESTIMATORS`;
* :mod:`.bandit`    — ``paper``: the bandit of Eq. 14–16 (:class:`BanditSearch`);
* :mod:`.vr_bandit` — ``bandit``: variance-reduced, warm-started from the cosine prior;
* :mod:`.greedy`    — ``greedy`` removal and ``loo`` (leave-one-out);
* :mod:`.portfolio` — ``portfolio``: greedy's plan checked against loo's and the prior's;
* :mod:`.stable`    — ``stable``: ``portfolio``, its ties broken by the untuned model's prior;
* :mod:`.prior`     — ``cosine``: the one-pass prior, and the probe that measures it;
* :mod:`.candidates` — what the arms stand for;
* :mod:`.scorer`    — the model side: measurements on a held-out batch, ``run_search``.
"""

from .bandit import BanditSearch, PaperBandit
from .candidates import Candidates
from .estimator import (
    COSINE,
    ESTIMATORS,
    EXAMPLES,
    LOSS,
    Estimator,
    Measurement,
    SearchSettings,
    estimator_class,
    register_estimator,
)
from .greedy import GreedyRemoval, LeaveOneOut
from .portfolio import GreedyPortfolio
from .prior import CosinePrior, residual_cosines
from .scorer import HeldOutScorer, run_search
from .stable import StablePortfolio, paired_se
from .vr_bandit import VarianceReducedBandit

__all__ = [
    "COSINE",
    "ESTIMATORS",
    "EXAMPLES",
    "LOSS",
    "BanditSearch",
    "Candidates",
    "CosinePrior",
    "Estimator",
    "GreedyPortfolio",
    "GreedyRemoval",
    "HeldOutScorer",
    "LeaveOneOut",
    "Measurement",
    "PaperBandit",
    "SearchSettings",
    "StablePortfolio",
    "VarianceReducedBandit",
    "estimator_class",
    "paired_se",
    "register_estimator",
    "residual_cosines",
    "run_search",
]
