"""How a context-aware classifier ``A_*`` is formed from prototypes ``C_*`` and the original ``C``.

The paper's choice is Eqs. (2)/(5), ``A_* = theta_*(C_* (+) C)``; Table 5 ablates the others. Each
design is registered by name so a spec selects it per branch (``design_y`` for the oracle,
``design_p`` for the estimate) and new ones can be added without touching the classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["Design", "DESIGNS", "register_design", "Projector"]


class Projector(nn.Sequential):
    """theta of Eqs. (2)/(5): Linear(in -> d/2), ReLU, Linear(d/2 -> d) (paper §4.1).

    ``first_bias=False`` is the official code's first layer (no bias); the paper does not say."""

    def __init__(self, in_dim: int, dim: int, hidden_ratio: float = 0.5, first_bias: bool = True) -> None:
        hidden = max(1, int(round(dim * hidden_ratio)))
        super().__init__(nn.Linear(in_dim, hidden, bias=first_bias), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


@dataclass(frozen=True)
class Design:
    """``projector_in(d)`` is the projector's input width (None: no projector); ``form`` builds A."""

    name: str
    label: str  # the paper's notation, for reports
    projector_in: Callable[[int], Optional[int]]
    form: Callable[[Tensor, Tensor, Optional[nn.Module]], Tensor]


DESIGNS: dict[str, Design] = {}


def register_design(design: Design) -> Design:
    if design.name in DESIGNS:
        raise KeyError(f"design {design.name!r} is already registered")
    DESIGNS[design.name] = design
    return design


def _concat(protos: Tensor, cls: Tensor) -> Tensor:
    return torch.cat([protos, cls.expand_as(protos)], dim=-1)


# protos: [B, N, D]; cls: [1, N, D] (broadcast over images); proj: the branch's projector.
for _d in (
    Design("proto", "A = C_*", lambda d: None, lambda p, c, f: p),
    Design("proto_plus_cls", "A = C_* + C", lambda d: None, lambda p, c, f: p + c),
    Design("proj_proto", "A = θ(C_*)", lambda d: d, lambda p, c, f: f(p)),
    Design("proj_sum", "A = θ(C_* + C)", lambda d: d, lambda p, c, f: f(p + c)),
    Design("proj_concat", "A = θ(C_* ⊕ C)", lambda d: 2 * d, lambda p, c, f: f(_concat(p, c))),
    Design(
        "proj_concat_residual", "A = θ(C_* ⊕ C) + C", lambda d: 2 * d, lambda p, c, f: f(_concat(p, c)) + c
    ),
    Design("classifier", "A = C", lambda d: None, lambda p, c, f: c.expand_as(p)),
):
    register_design(_d)
