"""What enters the measured enclave image: an explicit allowlist, one list for every consumer.

Everything in the enclave image is measured into PCR0, so everything in it is code a security reviewer
signs off on, and code an attacker could try to reach. The image therefore holds only what the enclave
runs: ``enclave_app`` and the parts of ``nitrovault`` it imports. The owner's tools (the CLI, the token
issuer in :mod:`nitrovault.owner`, the policy reviewer and builder, the EIF parser, the weight-watermark
embedder, the client) and the local stand-ins (:mod:`nitrovault.local`) are not in it, so no
configuration mistake or injected argument can make an enclave run them.

Consumers (all read :data:`IMAGE_ALLOWLIST` through :func:`image_files`):

* ``enclave_app/Dockerfile`` prunes its source stage to the list (``python image.py prune DIR``, this file
  run on its own: it imports only the standard library) and checks the result (``check``);
* :mod:`nitrovault.local.measure` measures exactly these files, so local PCRs describe the same tree;
* ``tests/unit/test_image.py`` proves the list is closed (every module the enclave imports is on it, and
  the enclave imports with nothing else present) and minimal (every listed module is imported).

An entry ending in ``/`` is a whole package (every file below it); any other entry is one file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["IMAGE_ALLOWLIST", "IMAGE_PACKAGES", "image_files", "unlisted_files"]

#: the top-level packages whose files may enter the image (a file outside them never does)
IMAGE_PACKAGES = ("enclave_app", "nitrovault")

IMAGE_ALLOWLIST: tuple[str, ...] = (
    "enclave_app/",
    "nitrovault/__init__.py",
    "nitrovault/py.typed",
    "nitrovault/errors.py",
    "nitrovault/clock.py",
    "nitrovault/subjects.py",
    "nitrovault/attestation.py",
    "nitrovault/data/aws_nitro_enclaves_root_g1.pem",
    "nitrovault/bindings.py",
    "nitrovault/identity.py",
    "nitrovault/nsm.py",
    "nitrovault/receipts.py",
    "nitrovault/audit.py",
    "nitrovault/access/__init__.py",
    "nitrovault/access/quota.py",
    "nitrovault/access/tokens.py",
    "nitrovault/envelope/",
    "nitrovault/kms/__init__.py",
    "nitrovault/kms/client.py",
    "nitrovault/kms/cms.py",
    "nitrovault/kms/endpoints.py",
    "nitrovault/kms/recipient.py",
    "nitrovault/protection/",
    "nitrovault/rpc/",
    "nitrovault/state/",
    "nitrovault/transport/__init__.py",
    "nitrovault/transport/address.py",
    "nitrovault/transport/admission.py",
    "nitrovault/transport/connect.py",
    "nitrovault/transport/loopback.py",
    "nitrovault/transport/relay.py",
    "nitrovault/transport/streams.py",
    "nitrovault/transport/vsock.py",
    "nitrovault/watermark/__init__.py",
    "nitrovault/watermark/embedding.py",
    "nitrovault/watermark/keys.py",
    "nitrovault/watermark/subjects.py",
    "nitrovault/watermark/text.py",
)

#: never part of an image, even under a listed package: caches, compiled files, the image's own recipe
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")
_SKIP_FILES = frozenset({"enclave_app/Dockerfile"})


def _walk(source_root: Path, top: str, *, everything: bool = False) -> Iterator[str]:
    """Relative paths of the files under ``top`` (without caches and compiled files unless ``everything``)."""
    for dirpath, dirnames, filenames in os.walk(source_root / top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if everything or d not in _SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(source_root).as_posix()
        for name in filenames:
            rel = f"{rel_dir}/{name}"
            if everything or (not name.endswith(_SKIP_SUFFIXES) and rel not in _SKIP_FILES):
                yield rel


def image_files(source_root: Path, *, strict: bool = False) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every file of the image, in sorted path order (bytewise).

    ``strict``: a listed file that does not exist is an error (the image build); otherwise it is
    simply absent (a partial tree measures what it holds). Symlinked directories are not followed.
    """
    found: set[str] = set()
    for entry in IMAGE_ALLOWLIST:
        if entry.endswith("/"):
            found.update(_walk(source_root, entry.rstrip("/")))
        elif (source_root / entry).is_file():
            found.add(entry)
        elif strict:
            raise FileNotFoundError(f"{entry} is on the image allowlist but not in {source_root}")
    return [(rel, source_root / rel) for rel in sorted(found, key=str.encode)]


def unlisted_files(source_root: Path) -> list[str]:
    """Files under the image packages that are not on the list (what :func:`prune` removes)."""
    listed = {rel for rel, _ in image_files(source_root)}
    return sorted(rel for package in IMAGE_PACKAGES for rel in _walk(source_root, package, everything=True)
                  if rel not in listed and "/__pycache__/" not in f"/{rel}")


def prune(source_root: Path) -> list[str]:
    """Remove every unlisted file, every cache folder and then-empty folder under the image packages;
    returns the removed files."""
    removed = unlisted_files(source_root)
    for rel in removed:
        (source_root / rel).unlink()
    for package in IMAGE_PACKAGES:
        for cache in sorted((source_root / package).rglob("__pycache__")):
            shutil.rmtree(cache)
        for dirpath, dirnames, filenames in os.walk(source_root / package, topdown=False):
            if not filenames and not any((Path(dirpath) / d).exists() for d in dirnames):
                os.rmdir(dirpath)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", choices=("prune", "check", "list"))
    parser.add_argument("root", type=Path, help="the source tree (holding enclave_app/ and nitrovault/)")
    args = parser.parse_args(argv)
    root: Path = args.root
    try:
        listed = image_files(root, strict=True)
    except FileNotFoundError as err:
        print(f"image allowlist: {err}", file=sys.stderr)
        return 1
    if args.command == "prune":
        removed = prune(root)
        print(f"image: {len(listed)} files kept, {len(removed)} removed")
    elif args.command == "check":
        extra = unlisted_files(root)
        if extra:
            print("image: files not on the allowlist: " + ", ".join(extra), file=sys.stderr)
            return 1
        print(f"image: exactly the {len(listed)} allowlisted files")
    else:
        for rel, _ in listed:
            print(rel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
