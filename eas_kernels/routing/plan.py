"""RoutePlan: which layers a per-example router may skip, what it skips, and how often."""

from __future__ import annotations

from collections.abc import Iterable

from .._checks import check_layer_indices, check_positive_finite, check_positive_int

UNITS = ("mha", "block")
_FORMAT = "eas_kernels.RoutePlan"
_VERSION = 1


class RoutePlan:
    """The configuration of per-example routing (ROE_SPEC §2–§4).

    Args:
        num_layers: number of transformer blocks of the model.
        unit: what a router skips: ``"block"`` (RoE as published: the whole layer,
            shortcut ``x + A(attention_norm(x))``) or ``"mha"`` (dynamic EAS: the MHA,
            shortcut ``x + FFN(v + PIA_s(v))`` with ``v = ffn_norm(x)``, EAS_SPEC §2).
        ratio: the target share ``ρ`` of routed units skipped, in ``[0, 1)``.
        layers: the routed layers (any order; stored sorted). Default: every layer.
        skip_rank: rank of the shortcut's adapter (``PIA_s``, or ``A``).
        adapter_rank: rank of ``A_k``, the adapter of every layer's kept branch (LaVIN's
            router adapter on the attention input, no token mixing: ``h = x + Attn(u +
            A_k(u))``), in every layer, routed or not; None: no kept adapters (the base
            model's layers run as they are, as RoE's published routing does).
        temperature: router temperature of the shortcut PIA's own path mixer (EAS's ``τ``;
            not the route's annealed temperature, which :class:`RouteSchedule
            <eas_kernels.routing.RouteSchedule>` sets).

    The adapters sit where EAS puts them (EAS_SPEC §2): ``A_k`` before every kept MHA,
    ``PIA_s`` in place of a skipped one. ``PIA_s`` (unit ``mha``) has the token-averaged
    down path of EAS and is re-parameterised into ``W1/W3`` for an example that skips the
    MHA; ``A`` (unit ``block``) has none
    (``token_mixing=False``) and stays an adapter.
    """

    __slots__ = (
        "num_layers", "unit", "ratio", "layers", "skip_rank", "adapter_rank", "temperature",
    )  # fmt: skip

    def __init__(
        self,
        num_layers: int,
        *,
        unit: str = "mha",
        ratio: float = 0.3,
        layers: Iterable[int] | None = None,
        skip_rank: int = 32,
        adapter_rank: int | None = 8,
        temperature: float = 10.0,
    ) -> None:
        self.num_layers = check_positive_int(num_layers, "num_layers")
        if not isinstance(unit, str) or unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        self.unit = unit
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"ratio must be a float in [0, 1), got {type(ratio).__name__}")
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"ratio must lie in [0, 1), got {ratio!r}")
        self.ratio = float(ratio)
        chosen = range(num_layers) if layers is None else layers
        self.layers = check_layer_indices(chosen, "layers", num_layers)
        if not self.layers:
            raise ValueError("layers must name at least one routed layer")
        self.skip_rank = check_positive_int(skip_rank, "skip_rank")
        self.adapter_rank = (
            None if adapter_rank is None else check_positive_int(adapter_rank, "adapter_rank")
        )
        self.temperature = check_positive_finite(temperature, "temperature")

    @property
    def token_mixing(self) -> bool:
        """Whether the shortcut's adapter averages the prompt (EAS's PIA: unit ``mha``)."""
        return self.unit == "mha"

    def to_dict(self) -> dict:
        """A JSON-serialisable description, read back by :meth:`from_dict`."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "num_layers": self.num_layers,
            "unit": self.unit,
            "ratio": self.ratio,
            "layers": list(self.layers),
            "skip_rank": self.skip_rank,
            "adapter_rank": self.adapter_rank,
            "temperature": self.temperature,
        }

    @classmethod
    def from_dict(cls, data: object) -> RoutePlan:
        """The plan of :meth:`to_dict`'s output; ValueError naming what does not fit."""
        if not isinstance(data, dict):
            raise TypeError(f"a route plan must be a dict, got {type(data).__name__}")
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(
                f"not a route plan of format {_FORMAT!r} version {_VERSION}: "
                f"format={data.get('format')!r}, version={data.get('version')!r}"
            )
        fields = (
            "num_layers", "unit", "ratio", "layers", "skip_rank", "adapter_rank", "temperature",
        )  # fmt: skip
        missing = [name for name in fields if name not in data]
        if missing:
            raise ValueError(f"route plan lacks {missing}")
        return cls(data["num_layers"], **{name: data[name] for name in fields[1:]})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutePlan):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()).__repr__())

    def __repr__(self) -> str:
        return (
            f"RoutePlan(num_layers={self.num_layers}, unit={self.unit!r}, ratio={self.ratio}, "
            f"layers={list(self.layers)}, skip_rank={self.skip_rank}, "
            f"adapter_rank={self.adapter_rank})"
        )
