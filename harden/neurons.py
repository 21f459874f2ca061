"""`NeuronSet`: which value channels of which layers are memorization neurons. A plain value object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch


@dataclass(frozen=True)
class NeuronSet:
    """{layer name: sorted, unique channel indices}. Empty layers are dropped so equal sets compare equal."""

    layers: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        clean = {}
        for name, idx in self.layers.items():
            values = sorted({int(i) for i in idx})
            if values and values[0] < 0:
                raise ValueError(f"negative neuron index in {name}: {values[0]}")
            if values:
                clean[name] = tuple(values)
        object.__setattr__(self, "layers", dict(sorted(clean.items())))

    @classmethod
    def from_lists(cls, names: list[str], lists: Iterable[Iterable[int]]) -> "NeuronSet":
        return cls(dict(zip(names, (tuple(x) for x in lists))))

    def __len__(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def __bool__(self) -> bool:
        return bool(self.layers)

    def counts(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.layers.items()}

    def union(self, *others: "NeuronSet") -> "NeuronSet":
        merged: dict[str, set[int]] = {}
        for s in (self, *others):
            for name, idx in s.layers.items():
                merged.setdefault(name, set()).update(idx)
        return NeuronSet({k: tuple(v) for k, v in merged.items()})

    def to_json(self) -> dict[str, list[int]]:
        return {name: list(idx) for name, idx in self.layers.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, list[int]]) -> "NeuronSet":
        if not isinstance(data, Mapping) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError("a neuron set is a JSON object {layer name: [channel indices]}")
        return cls({str(k): tuple(int(i) for i in v) for k, v in data.items()})

    def check_against(self, widths: Mapping[str, int]) -> None:
        """Refuse layers the model does not have and indices out of range, before any weight is touched."""
        for name, idx in self.layers.items():
            if name not in widths:
                raise ValueError(f"neuron set names layer {name!r}, which is not a target layer of this model")
            if idx[-1] >= widths[name]:
                raise ValueError(f"neuron {idx[-1]} is out of range for {name} (width {widths[name]})")

    def masks(self, widths: Mapping[str, int], factor: float = 0.0) -> dict[str, torch.Tensor]:
        """[1, width] multiplicative masks: `factor` at the set's channels, 1 elsewhere (other layers omitted)."""
        self.check_against(widths)
        out = {}
        for name, idx in self.layers.items():
            m = torch.ones(1, widths[name])
            m[0, list(idx)] = factor
            out[name] = m
        return out
