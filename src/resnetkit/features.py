"""Feature levels of a network, described as timm describes them: FeatureInfo (channels,
reduction and module of each level, with the levels a backbone outputs) and the index rule of
forward_intermediates."""
from __future__ import annotations

import copy
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from .errors import UserError


def feature_take_indices(num_levels: int, indices: Optional[Union[int, List[int]]] = None
                         ) -> Tuple[List[int], int]:
    """(levels to take, the largest of them), timm's rule: None takes every level, an int n
    the last n, a list those levels (negative ones count from the end)."""
    if indices is None:
        indices = num_levels
    if isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise UserError(f"indices={indices} asks for the last {indices} feature levels; "
                            f"this network has 1 to {num_levels}")
        take = [num_levels - indices + i for i in range(indices)]
    else:
        take: List[int] = []
        for i in indices:
            idx = num_levels + i if i < 0 else i
            if not 0 <= idx < num_levels:
                raise UserError(f"feature level {i} is out of range: this network has levels "
                                f"0..{num_levels - 1}")
            take.append(idx)
        if len(take) == 0:
            raise UserError("indices is empty: name at least one feature level")
    return take, max(take)


class FeatureInfo:
    """The feature levels of a network (dicts with num_chs, reduction, module, index) and the
    ones it outputs (out_indices). Indexing and len() cover every level; channels(),
    reduction(), module_name() and get_dicts() answer for the output levels, or for the
    levels given as idx."""

    def __init__(self, info: Sequence[dict[str, Any]], out_indices: Sequence[int]):
        self.info = [dict(d, index=i) for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def from_other(self, out_indices: Sequence[int]) -> "FeatureInfo":
        return FeatureInfo(copy.deepcopy(self.info), out_indices)

    def get(self, key: str, idx: Optional[Union[int, Sequence[int]]] = None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None,
                  idx: Optional[Union[int, Sequence[int]]] = None):
        pick = (lambda d: d) if keys is None else (lambda d: {k: d[k] for k in keys})
        if idx is None:
            return [pick(self.info[i]) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def channels(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self.get("reduction", idx)

    def module_name(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info}, out_indices={self.out_indices})"


def is_exporting() -> bool:
    """Whether the forward runs under a tracer or compiler (TorchScript tracing, torch.fx,
    torch.compile / torch.export), where Python-level input checks must step aside."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.fx._symbolic_trace.is_fx_symbolic_tracing())
