"""Generic handler: a ``torch.nn.Module`` whose code is registered in the (measured) image, whose
hyper-parameters arrive in the sealed metadata and whose weights are the sealed tensors.

Register an architecture by adding a factory to :data:`ARCHITECTURES`; it receives the decoded
``nitrovault.config`` JSON object and returns an uninitialised module (built on the ``meta`` device).
The module is called with keyword tensors named as in the request and returns a tensor or a mapping of
named tensors. A module class that sets ``rows_independent = True`` (each output row depends on its input
row only) lets concurrent calls share one forward pass; any other is called once per call.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from enclave_app.models.base import InvalidInputError, ModelLoadError, UnsupportedCallError

CONFIG_KEY = "nitrovault.config"


class MLPClassifier(nn.Module):
    """A small feed-forward classifier: ``x`` [batch, features] → ``probabilities`` [batch, classes]."""

    #: each output row depends on its input row only (calls may share a forward pass)
    rows_independent = True

    def __init__(self, in_features: int, hidden: Sequence[int], classes: int) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], classes))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"logits": logits, "probabilities": torch.softmax(logits, dim=-1)}


ARCHITECTURES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "mlp-classifier": lambda c: MLPClassifier(int(c["in_features"]), list(c["hidden"]), int(c["classes"])),
}


@dataclass
class GenericHandler:
    module: nn.Module
    architecture: str
    kind: str = "generic"

    @property
    def rows_independent(self) -> bool:
        return getattr(self.module, "rows_independent", False) is True

    @classmethod
    def load(
        cls, architecture: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
    ) -> GenericHandler:
        factory = ARCHITECTURES.get(architecture)
        if factory is None:
            raise ModelLoadError(f"architecture {architecture!r} is not registered in this image")
        try:
            config = json.loads(metadata.get(CONFIG_KEY, "{}"))
            with torch.device("meta"):
                module = factory(config)
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"bad architecture config ({type(err).__name__})") from None
        try:
            module.load_state_dict(dict(tensors), strict=True, assign=True)
        except RuntimeError:
            raise ModelLoadError("sealed tensors do not fit the registered architecture") from None
        module.eval()
        return cls(module=module, architecture=architecture)

    def warm_up(self) -> None:
        in_features = getattr(self.module, "in_features", None)
        if isinstance(in_features, int):
            self.infer({"x": torch.zeros(1, in_features)})

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        raise UnsupportedCallError("this model serves Infer, not Embed")

    @torch.inference_mode()
    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            out = self.module(**inputs)
        except (TypeError, RuntimeError, ValueError, IndexError) as err:
            raise InvalidInputError(f"inputs do not fit the model ({type(err).__name__})") from None
        if isinstance(out, torch.Tensor):
            return {"output": out}
        if isinstance(out, Mapping):
            return {str(k): v for k, v in out.items()}
        raise InvalidInputError("model returned neither a tensor nor a mapping")
