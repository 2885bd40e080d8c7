"""eas_kernels: Efficient Attention Skipping (EAS, ICML 2024) for LLaMA-family models.

Public API:
    PIA, PIAState           the propagation-of-information adapter and its frozen state
    SkipPlan                which MHAs (and FFNs) are skipped, adapter ranks, temperature
    patch_lavin             install EAS on LaVIN / Meta-LLaMA style blocks, in place
    patch_hf, unpatch_hf    the same on Hugging Face LLaMA / LLaVA models (generate, Trainer)
    prompt_mask_from_labels the prompt mask HF training uses (tokens before the first label)
    save_pretrained, from_pretrained   plan + PIA weights only (safetensors)
    set_skipped             change the skip set between steps (search)
    skipped_mhas            the layers whose MHA a patched model currently skips
    current_plan            the plan of a patched model's current skip sets
    set_prompt_mask         prompt mask for models whose forward takes none
    unpatch                 undo a patch: weights, hooks, PIAs, requires_grad as before
    reparameterize, restore merge / low-rank / eager decode; put weights back bitwise
    expected_new_tokens     the answer length "auto" chooses its mode for (custom loops)
    greedy_generate         left-padded batched greedy decoding (prefill, then steps)
    roles                   layer roles (Role: kept, skipped MHA/FFN/block), candidate sets
    routing                 per-example routing (RoE): RoutePlan, patch_routes, RouteSchedule,
                            route_loss, set_routing, force_routes
    models.lavin            the LaVIN-layout LLaMA (ModelArgs, Transformer)
    search.BanditSearch     the k-armed bandit of the redundancy search (pure PyTorch)
    search.ESTIMATORS       the search's estimators (paper, bandit, greedy, loo, cosine,
                            portfolio, stable)
    search.HeldOutScorer    what an estimator asks for, measured on a held-out batch
    search.Candidates       what the arms stand for: MHAs, FFNs, MHA-or-FFN, blocks (DAS)
    tuning                  the schedule (EASTuner, TuningConfig), data, evaluation, plots
    models.multimodal       a LaVIN-style multimodal model (vision tower + projector)
    demo                    the demo application (easy-vqa workload); not imported here
    eas-kernels             the command line (eas_kernels.cli): search, finetune, ...
"""

from . import models, roles, routing, search, tuning
from ._native import backends
from .checkpoint import from_pretrained, save_pretrained
from .generation import Generation, greedy_generate
from .hf import kv_cache_bytes, patch_hf, prompt_mask_from_labels, unpatch_hf
from .patch import (
    current_plan,
    patch_lavin,
    set_prompt_mask,
    set_skipped,
    skipped_mhas,
    unpatch,
)
from .pia import PIA, PIAState
from .plan import SkipPlan
from .reparam import expected_new_tokens, reparameterize, restore

__version__ = "0.1.0"

__all__ = [
    "PIA",
    "Generation",
    "PIAState",
    "SkipPlan",
    "backends",
    "current_plan",
    "expected_new_tokens",
    "from_pretrained",
    "greedy_generate",
    "kv_cache_bytes",
    "models",
    "patch_hf",
    "patch_lavin",
    "prompt_mask_from_labels",
    "reparameterize",
    "restore",
    "roles",
    "routing",
    "save_pretrained",
    "search",
    "tuning",
    "set_prompt_mask",
    "set_skipped",
    "skipped_mhas",
    "unpatch",
    "unpatch_hf",
]
