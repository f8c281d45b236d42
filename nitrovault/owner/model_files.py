"""Safetensors files in and out of hardening (:mod:`nitrovault.owner.harden`), and one hardened copy made
and registered in one step (:func:`harden_file`, used by ``nitrovault harden``, ``nitrovault seal`` and
the local stack).

Floating tensors are read as float32 (bf16/f16 included) and written back in their own dtype; other
tensors and the header metadata pass through (the config entry updated for trap units). Files are written
0600 and atomically: a hardened copy may sit next to secrets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nitrovault.errors import ConfigError
from nitrovault.owner.fingerprint import Registry, harden_copy
from nitrovault.owner.harden import DEFAULT_TRAPS, HardenReport, Model


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a mapping)
    except (OSError, SafetensorError, ValueError) as err:
        raise ConfigError(f"{path} is not a readable safetensors file ({type(err).__name__})") from None
    return tensors, metadata


def _arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: (t.float().numpy() if t.is_floating_point() else t.numpy()) for name, t in tensors.items()}


def read_model(path: Path) -> tuple[Model, dict[str, torch.dtype]]:
    """The model in ``path`` and its tensors' dtypes; :class:`ConfigError` for an unreadable file or an
    architecture hardening does not know."""
    tensors, metadata = _read(path)
    return Model.from_file_parts(_arrays(tensors), metadata), {name: t.dtype for name, t in tensors.items()}


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Only the tensors of ``path`` (a leaked suspect need not keep our metadata)."""
    return _arrays(_read(path)[0])


def write_model(model: Model, path: Path, dtypes: dict[str, torch.dtype]) -> None:
    """Write ``model`` to ``path`` (0600, atomically), each tensor in its original dtype."""
    tensors = {name: torch.from_numpy(np.ascontiguousarray(t)).to(dtypes.get(name, torch.float32))
               for name, t in model.tensors.items()}
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        save_file(tensors, str(partial), metadata=model.file_metadata())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def harden_file(source: Path, output: Path, master: bytes, copy_id: str, registry_path: Path, *,
                traps: int | None = None, value_strength: float | None = None,
                again: bool = False) -> tuple[HardenReport, Registry]:
    """Write ``source`` hardened as copy ``copy_id`` to ``output`` and record the copy in
    ``registry_path`` (created for a first copy, with ``traps`` per FFN layer and the copies' value mark
    ``value_strength``; an existing registry's must not be asked otherwise). The registry is written
    first: a copy that exists is always traceable (a failed write of ``output`` leaves at most an unused
    registry entry). A copy id already registered is refused, unless ``again`` (the same secret makes the
    same copy: a lost file is made again, not a second copy)."""
    reference, dtypes = read_model(source)
    if registry_path.exists():
        registry = Registry.load(registry_path)
        if traps is not None and traps != registry.traps:
            raise ConfigError(f"the registry's copies have {registry.traps} traps per layer, not {traps}")
        if value_strength is not None and value_strength != registry.value_strength:
            raise ConfigError(f"the registry's copies have value mark strength {registry.value_strength:g}, "
                              f"not {value_strength:g}")
    else:
        registry = Registry.new(master, reference, traps=DEFAULT_TRAPS if traps is None else traps,
                                value_strength=value_strength or 0.0)
    registry.check(master, reference)
    if not (again and copy_id in registry.copies):
        registry = registry.with_copy(copy_id)
    hardened, report = harden_copy(reference, master, registry, copy_id)
    registry.save(registry_path)
    write_model(hardened, output, dtypes)
    return report, registry
