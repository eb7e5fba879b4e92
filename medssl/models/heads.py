"""SSL heads: MLP projectors/predictors and SwAV prototypes.

The layouts match the published heads so imported weights load without renaming:
``MLPHead`` is an ``nn.Sequential`` of ``[Linear, BatchNorm1d, ReLU] * (num_layers - 1) + [Linear]`` (plus an
optional final ``BatchNorm1d``), i.e. state_dict keys ``"0.weight"``, ``"1.running_mean"``, ``"3.weight"`` ...
as in SimSiam (``encoder.fc`` / ``predictor``), SwAV (``projection_head``), solo-learn and SimCLRv2 heads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Sequential):
    """Projector / predictor MLP.

    Args:
        in_dim: input features (the backbone's ``num_features`` for a projector).
        hidden_dim: width of the hidden layers.
        out_dim: output dimension.
        num_layers: number of Linear layers (>= 1). Default 2.
        hidden_bias: bias on hidden Linear layers. Default True.
        last_bias: bias on the last Linear layer. Default True.
        last_bn: append a BatchNorm1d after the last Linear (SimSiam projector, SimCLRv2). Default False.
        last_bn_affine: whether that final BatchNorm1d has gamma/beta. Default True.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        hidden_bias: bool = True,
        last_bias: bool = True,
        last_bn: bool = False,
        last_bn_affine: bool = True,
    ) -> None:
        if num_layers < 1:
            raise ValueError("MLPHead needs num_layers >= 1")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=hidden_bias), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=last_bias))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
        super().__init__(*layers)
        self.config = {
            "in_dim": in_dim,
            "hidden_dim": hidden_dim,
            "out_dim": out_dim,
            "num_layers": num_layers,
            "hidden_bias": hidden_bias,
            "last_bias": last_bias,
            "last_bn": last_bn,
            "last_bn_affine": last_bn_affine,
        }
        self.in_dim, self.out_dim = in_dim, out_dim

    @classmethod
    def config_from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> dict:
        """Infer the constructor arguments from a state_dict in MLPHead layout.

        Raises:
            ValueError: when the keys do not follow the ``[Linear, BN, ReLU]*`` layout.
        """
        idx = sorted({int(m.group(1)) for k in state if (m := re.match(r"^(\d+)\.", k))})
        linears = [i for i in idx if f"{i}.weight" in state and state[f"{i}.weight"].ndim == 2]
        if not linears:
            raise ValueError("no Linear layer found in head state_dict")
        n = len(linears)
        if linears != [3 * i for i in range(n)]:
            raise ValueError(f"head Linear layers at positions {linears}, expected {[3 * i for i in range(n)]}")
        last = linears[-1]
        first_w = state[f"{linears[0]}.weight"]
        last_w = state[f"{last}.weight"]
        bn_idx = last + 1
        last_bn = f"{bn_idx}.running_mean" in state
        return {
            "in_dim": int(first_w.shape[1]),
            "hidden_dim": int(first_w.shape[0]) if n > 1 else int(last_w.shape[0]),
            "out_dim": int(last_w.shape[0]),
            "num_layers": n,
            "hidden_bias": n > 1 and f"{linears[0]}.bias" in state,
            "last_bias": f"{last}.bias" in state,
            "last_bn": last_bn,
            "last_bn_affine": last_bn and f"{bn_idx}.weight" in state,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> MLPHead:
        """Build a head whose configuration fits ``state`` and load it (strict)."""
        head = cls(**cls.config_from_state_dict(state))
        head.load_state_dict(dict(state), strict=True)
        return head


class Prototypes(nn.Linear):
    """SwAV prototypes: ``K`` vectors of dimension ``dim`` (state_dict key ``"weight"``, shape (K, dim)).

    ``forward(z)`` returns the scores ``z @ W.T`` (N, K); call :meth:`normalize_` to keep rows unit-norm.
    """

    def __init__(self, dim: int, num_prototypes: int = 3000) -> None:
        super().__init__(dim, num_prototypes, bias=False)

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise every prototype in place."""
        self.weight.copy_(F.normalize(self.weight, dim=1))


class InputNormalization(nn.Module):
    """Map images in [0, 1] to what a checkpoint expects: ``(x - mean) / std`` per channel.

    Args:
        mean: per-channel mean (length C or 1).
        std: per-channel std (length C or 1).
    """

    def __init__(self, mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @classmethod
    def from_spec(cls, spec: Mapping | None) -> InputNormalization:
        """From ``{"mean": [...], "std": [...]}``; None gives ImageNet statistics."""
        if spec is None:
            spec = IMAGENET_NORMALIZATION
        return cls(list(spec["mean"]), list(spec["std"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


#: torchvision / most PyTorch ports
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "description": "[0,1] then ImageNet mean/std"}
