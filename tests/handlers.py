"""Enclave handlers of the suite's real models, loaded the way the enclave's boot loads them.

Imported as ``from handlers import ...`` (``tests/`` is on ``sys.path`` the way ``fakes.py`` is).
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch

from enclave_app.models import load_handler
from enclave_app.models.causal_lm import CausalLMHandler
from nitrovault.local.tiny_lm import sealing_metadata


def lm_handler(folder: Path) -> CausalLMHandler:
    """The causal-LM handler of a tiny LM folder (the ``tiny_lm`` fixture's), from its plain files."""
    metadata = sealing_metadata(folder)
    handler = load_handler(metadata["nitrovault.handler"],
                           safetensors.torch.load_file(str(folder / "model.safetensors")), metadata)
    assert isinstance(handler, CausalLMHandler)
    return handler
