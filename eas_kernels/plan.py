"""SkipPlan: which MHAs (and FFNs) a model skips, and the sizes of the adapters replacing them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from ._checks import check_layer_indices, check_positive_finite, check_positive_int
from .roles import Role, role_for

_FORMAT = "eas_kernels.SkipPlan"
_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # v1 documents have no "skipped_ffns"
STATES = ("frozen", "running")


class SkipPlan:
    """The result of the redundancy search (EAS_SPEC §2, §5).

    Args:
        num_layers: number of transformer blocks of the model the plan is for.
        skipped: 0-based indices of the blocks whose MHA is skipped (any order; stored
            sorted). No duplicates, each in ``[0, num_layers)``.
        skipped_ffns: blocks whose FFN is skipped (the paper's Table 3 candidates "FFN"
            and "MHA or FFN"); empty for EAS. A block in both sets is skipped whole, as DAS
            does (EAS_SPEC §6).
        skip_rank: rank of the PIA that replaces a skipped MHA or FFN, and of DAS's
            adapter (paper: 32).
        adapter_rank: rank of the router adapter before each kept MHA (paper: 8).
        temperature: router temperature ``τ`` of every PIA (paper: 10).
        token_mixing: whether the PIAs of skipped MHAs and FFNs have the token-averaged
            down path ``f_d2`` (Eq. 4). False gives the paper's Table 4 "Base": one down
            path only (``c = b_d1``); the router still reads ``ū``.
        state: ``"frozen"`` (EAS_SPEC §3: every PIA state is computed over the prompt at
            the prefill and frozen; re-parameterisable) or ``"running"`` (the Table 4
            ablation without the frozen bias term: token ``t``'s state is computed from
            the mean of the tokens up to ``t``, prompt and answer, and updated at every
            decode step; decode stays eager, since the weights would change per token).

    What each block runs, by role (:meth:`role`; :mod:`eas_kernels.roles`)::

        kept           h = x + Attn(u + PIA_a(u));  out = h + FFN(ffn_norm(h))
        skipped_mha    out = x + FFN(v + PIA_s(v))
        skipped_ffn    out = x + Attn(u + PIA_f(u))
        skipped_block  out = x + A(u)         (MHA and FFN skipped: DAS)

    with ``u = attention_norm(x)`` and ``v = ffn_norm(x)``.

    ``PIA_a`` has rank ``adapter_rank`` and no token mixing; ``PIA_s`` and ``PIA_f`` have
    rank ``skip_rank`` with token mixing and are re-parameterised into ``W1/W3`` and
    ``wq/wk/wv``; ``A`` (rank ``skip_rank``, no token mixing) stays an adapter.
    """

    __slots__ = (
        "num_layers",
        "skipped",
        "skipped_ffns",
        "skip_rank",
        "adapter_rank",
        "temperature",
        "token_mixing",
        "state",
    )

    def __init__(
        self,
        num_layers: int,
        skipped: Iterable[int],
        *,
        skipped_ffns: Iterable[int] = (),
        skip_rank: int = 32,
        adapter_rank: int = 8,
        temperature: float = 10.0,
        token_mixing: bool = True,
        state: str = "frozen",
    ) -> None:
        num_layers = check_positive_int(num_layers, "num_layers")
        object.__setattr__(self, "num_layers", num_layers)
        object.__setattr__(self, "skipped", check_layer_indices(skipped, "skipped", num_layers))
        object.__setattr__(
            self, "skipped_ffns", check_layer_indices(skipped_ffns, "skipped_ffns", num_layers)
        )
        object.__setattr__(self, "skip_rank", check_positive_int(skip_rank, "skip_rank"))
        object.__setattr__(self, "adapter_rank", check_positive_int(adapter_rank, "adapter_rank"))
        object.__setattr__(self, "temperature", check_positive_finite(temperature, "temperature"))
        if not isinstance(token_mixing, bool):
            raise TypeError(f"token_mixing must be a bool, got {token_mixing!r}")
        object.__setattr__(self, "token_mixing", token_mixing)
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        object.__setattr__(self, "state", state)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("SkipPlan is immutable")

    def __reduce__(self) -> tuple[object, tuple[dict[str, object]]]:
        """Copy and pickle through the validated constructor."""
        return SkipPlan.from_dict, (self.to_dict(),)

    @property
    def kept_mhas(self) -> tuple[int, ...]:
        """Indices of the blocks whose MHA runs (their FFN may be skipped)."""
        skipped = set(self.skipped)
        return tuple(i for i in range(self.num_layers) if i not in skipped)

    @property
    def skipped_blocks(self) -> tuple[int, ...]:
        """Blocks skipped whole (MHA and FFN): DAS's skipped layers."""
        ffns = set(self.skipped_ffns)
        return tuple(i for i in self.skipped if i in ffns)

    def role(self, layer: int) -> Role:
        """What block ``layer`` runs: :data:`~eas_kernels.roles.KEPT`, ``SKIPPED_MHA``,
        ``SKIPPED_FFN`` or ``SKIPPED_BLOCK``."""
        return role_for(layer in self.skipped, layer in self.skipped_ffns)

    def replace(self, **changes: object) -> SkipPlan:
        """A copy with some fields changed (validated like the constructor)."""
        return SkipPlan.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, object]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "num_layers": self.num_layers,
            "skipped": list(self.skipped),
            "skipped_ffns": list(self.skipped_ffns),
            "skip_rank": self.skip_rank,
            "adapter_rank": self.adapter_rank,
            "temperature": self.temperature,
            "token_mixing": self.token_mixing,
            "state": self.state,
        }

    @classmethod
    def from_dict(cls, data: object) -> SkipPlan:
        if not isinstance(data, dict):
            raise TypeError(f"a SkipPlan is read from a JSON object, got {type(data).__name__}")
        if data.get("format") != _FORMAT or data.get("version") not in _READABLE_VERSIONS:
            raise ValueError(
                f"not a SkipPlan v{_VERSION} document: format={data.get('format')!r}, "
                f"version={data.get('version')!r}"
            )
        fields = {"num_layers", "skipped", "skip_rank", "adapter_rank", "temperature"}
        optional = {"skipped_ffns", "token_mixing", "state"}
        unknown = set(data) - fields - optional - {"format", "version"}
        missing = fields - set(data)
        if unknown or missing:
            raise ValueError(
                f"SkipPlan JSON has unknown keys {sorted(unknown)} / missing keys {sorted(missing)}"
            )
        for key in ("skipped", "skipped_ffns"):
            if not isinstance(data.get(key, []), list):
                raise TypeError(f"SkipPlan JSON {key!r} must be a list, got {data[key]!r}")
        return cls(
            data["num_layers"],
            data["skipped"],
            skipped_ffns=data.get("skipped_ffns", []),
            skip_rank=data["skip_rank"],
            adapter_rank=data["adapter_rank"],
            temperature=data["temperature"],
            token_mixing=data.get("token_mixing", True),
            state=data.get("state", "frozen"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SkipPlan:
        if not isinstance(text, (str, bytes)):
            raise TypeError(f"text must be a JSON string, got {type(text).__name__}")
        data = parse_json(text, "text")
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SkipPlan:
        """The plan of a JSON file; ``ValueError`` naming ``path`` when it is no plan."""
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory, not a plan JSON file")
        with open(path, "rb") as handle:
            text = handle.read()
        try:
            return cls.from_json(text.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not a plan JSON file: {error}") from None
        except (ValueError, TypeError) as error:
            raise type(error)(f"{path}: {error}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SkipPlan):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in self.__slots__))

    def _ablations(self) -> str:
        mixing = "" if self.token_mixing else ", token_mixing=False"
        return mixing + ("" if self.state == "frozen" else f", state={self.state!r}")

    def __repr__(self) -> str:
        ffns = f"skipped_ffns={list(self.skipped_ffns)}, " if self.skipped_ffns else ""
        return (
            f"SkipPlan(num_layers={self.num_layers}, skipped={list(self.skipped)}, {ffns}"
            f"skip_rank={self.skip_rank}, adapter_rank={self.adapter_rank}, "
            f"temperature={self.temperature}{self._ablations()})"
        )


def parse_json(text: str | bytes, name: str) -> object:
    """``json.loads(text)``; ``ValueError`` naming ``name`` for text that is not JSON or is
    nested too deeply to parse (``RecursionError``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{name} is JSON nested too deeply to be a plan") from None
