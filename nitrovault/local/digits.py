"""A second local demo model: a digits classifier served with every model-stealing protection on.

``nitrovault local up --model digits`` serves it. The model is
:class:`enclave_app.models.generic.MLPClassifier` (64 → 64 → 10) trained here on scikit-learn's digits
(8x8 images, pixels scaled to [0, 1]; ~1 s, deterministic), written once to
``HOME/owner/plain/digits.safetensors`` with its architecture config and, as a sealed extra, a reference
sample of its training inputs for the extraction detector's coverage signal. The measured protection
section (:data:`DIGITS_PROTECTION`) is the default an owner should start from (docs/model-stealing.md):
reverse-sigmoid answers and detection with the default actions, plus a Laplace mechanism whose budget
caps each subject at 1,000 answered rows a day. Honestly: ε = 20 per row is no meaningful DP guarantee
(noise of scale 0.1 on each probability, which keeps the arg-max of confident answers); it shows the
budget being spent and enforced. An ε that means something (≤ 1) makes 10-class answers noise.

Example::

    model = digits_model(Paths(home))
    stack = LocalStack(home, model=model)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from nitrovault.envelope.extras import REFERENCE_TENSOR

if TYPE_CHECKING:
    from enclave_app.models.generic import MLPClassifier
    from nitrovault.client import NitrovaultClient

DIGITS_ID = "digits"
DIGITS_VERSION = "1"
DIGITS_HANDLER = "generic:mlp-classifier"
HIDDEN = 64
#: the default an owner should start from (docs/model-stealing.md), per subject
DIGITS_PROTECTION: Mapping[str, Any] = MappingProxyType({
    "hardening": {"kind": "reverse_sigmoid", "beta": 1.0, "gamma": 0.3},
    "privacy": {"mechanism": {"kind": "laplace", "epsilon": 20.0, "sensitivity": 2.0},
                "budget": {"epsilon": 20_000.0}},
    "extraction": {"volume_max": 2000},
})
#: rows of the training set sealed as the coverage reference
REFERENCE_ROWS = 500


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): scikit-learn's digits, pixels / 16, a stratified 70/30 split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # the bench extra; installed by make
        raise RuntimeError("the digits demo needs scikit-learn (pip install '.[bench]')") from err
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def train_classifier(x: np.ndarray, y: np.ndarray, *, hidden: int = HIDDEN, epochs: int = 150,
                     seed: int = 0) -> MLPClassifier:
    """Full-batch Adam on the small MLP (~1 s on one core); the module, in eval mode."""
    import torch
    from torch import nn

    from enclave_app.models.generic import MLPClassifier

    torch.manual_seed(seed)
    model = MLPClassifier(x.shape[1], [hidden], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt)["logits"], yt)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return model.eval()


def save_classifier(model: MLPClassifier, path: Path, *, reference: np.ndarray) -> None:
    """Write ``model`` as the plain file a local stack seals: its weights, the ``generic:mlp-classifier``
    metadata (the architecture read off the module) and ``reference`` (natural inputs, the extraction
    detector's coverage sample) as the sealed extra tensor."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    config = {"in_features": linears[0].in_features, "hidden": [m.out_features for m in linears[:-1]],
              "classes": linears[-1].out_features}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors[REFERENCE_TENSOR] = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    save_file(tensors, str(path), metadata={"nitrovault.handler": DIGITS_HANDLER,
                                            "nitrovault.config": json.dumps(config)})


def write_digits_weights(path: Path, *, seed: int = 0) -> Path:
    """Train the classifier and write its plain safetensors file (config in the metadata, the coverage
    reference as a sealed extra). Written once: an existing file is kept."""
    if path.is_file():
        return path
    x_train, y_train, _, _ = digits_data(seed)
    model = train_classifier(x_train, y_train, seed=seed)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_classifier(model, partial, reference=x_train[:REFERENCE_ROWS])
    partial.replace(path)
    return path


def digits_demo(client: NitrovaultClient) -> str:
    """The demo step's call: 20 held-out digits through the relay, against their true labels."""
    _, _, x_test, y_test = digits_data()
    outputs = client.infer({"x": x_test[:20]})
    predicted = outputs["probabilities"].argmax(axis=1)
    right = int((predicted == y_test[:20]).sum())
    return (f"{right}/20 held-out digits right; the answer holds only {sorted(outputs)} "
            f"(perturbed, arg-max kept), never the logits")
