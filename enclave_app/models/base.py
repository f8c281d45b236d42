"""The interface every model handler implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from nitrovault.errors import NitrovaultError

if TYPE_CHECKING:
    from enclave_app.models.causal_lm import Generated, TextRequest


class ModelLoadError(NitrovaultError):
    """The unsealed tensors do not fit the configured handler (missing keys, bad metadata)."""

    step = "model-load"


class UnsupportedCallError(NitrovaultError):
    """The model cannot serve this method (e.g. ``Embed`` on a classifier)."""

    step = "model-call"


class InvalidInputError(NitrovaultError):
    """The caller's input does not fit the model (names, dtypes, shapes)."""

    step = "model-input"


class ModelHandler(Protocol):
    #: what ``Info`` reports, e.g. ``sentence-embedding``
    kind: str
    #: whether row i of every ``infer`` output depends on row i of the inputs only, so that concurrent
    #: calls may share one forward pass (:mod:`enclave_app.forward`); ``embed`` rows always are
    @property
    def rows_independent(self) -> bool: ...

    def warm_up(self) -> None: ...

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray: ...

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class TextGenerator(Protocol):
    """A handler that also serves ``Generate`` (text in, text streamed out: a causal LM with a tokenizer)."""

    def generate(self, request: TextRequest, emit: Callable[[str, int], None],
                 cancelled: Callable[[], bool]) -> Generated: ...
