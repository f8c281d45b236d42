"""The demo model ``nitrovault local up`` serves is a hardened copy: the README's identify command names
it, and it computes what the packaged MiniLM computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from test_cli_harden import runner
from test_harden import MAX_ABS_DIFF

from enclave_app.models import load_handler
from nitrovault.cli import app
from nitrovault.local.homes import Paths
from nitrovault.local.models import DEMO_COPY_ID, DEMO_PAIRS, demo_handler, demo_model, demo_original
from nitrovault.local.watermark_words import CANDIDATE_WORDS


def test_the_served_demo_is_a_registered_hardened_copy_of_the_same_function(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    served = demo_model(paths).weights
    result = runner.invoke(app, ["fingerprint", "identify", str(served), "--registry",
                                 str(paths.fingerprint_registry), "--reference", str(demo_original(paths)),
                                 "--key-file", str(paths.owner_harden_key)])
    assert result.exit_code == 0 and f"IDENTIFIED copy {DEMO_COPY_ID!r}" in result.output, result.output
    with safe_open(str(served), "pt") as f:
        handler = load_handler("sentence-embedding", {k: f.get_tensor(k) for k in f.keys()},  # noqa: SIM118
                               dict(f.metadata()))
    torch.set_num_threads(1)
    texts = [t for pair in DEMO_PAIRS for t in pair] + [" ".join(CANDIDATE_WORDS[:8])]
    diff = np.abs(handler.embed(texts, normalize=False) - demo_handler().embed(texts, normalize=False))
    assert float(diff.max()) <= MAX_ABS_DIFF
    assert demo_model(paths).weights == served and served.stat().st_mode & 0o777 == 0o600  # made once
