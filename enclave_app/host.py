"""The enclave's client of the parent's host services (credentials, sealed model, status reports).

Nothing the parent returns is trusted for more than it is: credentials only let KMS evaluate the key
policy (which demands our attestation anyway); the sealed model is ciphertext that must authenticate under
the released key. The sealed model (ciphertext) is received into the run directory, which is RAM in an
enclave (it has no disk), bounded by the measured config's ``max_model_bytes``, with offsets and sizes
checked chunk by chunk; a partial download is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import grpc

from enclave_app.boot import BootFailure
from nitrovault.kms import AwsCredentials
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class HostClient:
    def __init__(
        self, target: str, *, download_dir: Path, max_model_bytes: int, timeout: float = 30.0
    ) -> None:
        self._download_dir = download_dir
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 8 << 20)])
        self._stub = pb_grpc.HostServicesStub(self._channel)
        self._max = max_model_bytes
        self._timeout = timeout

    def credentials(self) -> AwsCredentials:
        try:
            creds = self._stub.GetCredentials(pb.CredentialsRequest(), timeout=self._timeout)
        except grpc.RpcError as err:
            raise BootFailure("credentials", f"host services unavailable ({err.code().name})") from None
        if not creds.access_key_id or not creds.secret_access_key:
            raise BootFailure("credentials", "parent returned no credentials")
        return AwsCredentials(creds.access_key_id, creds.secret_access_key, creds.session_token or None)

    def sealed_model(self, model_id: str) -> Path:
        path = self._download_dir / "model.sealed"
        try:
            with path.open("wb") as out:
                os.chmod(path, 0o600)
                self._download(model_id, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        return path

    def _download(self, model_id: str, out: object) -> None:
        write = out.write  # type: ignore[attr-defined]
        expected_total: int | None = None
        received = 0
        try:
            for chunk in self._stub.FetchSealedModel(pb.FetchRequest(model_id=model_id), timeout=600):
                if expected_total is None:
                    expected_total = chunk.total_size
                    if expected_total > self._max:
                        raise BootFailure("fetch", "sealed model larger than the configured maximum")
                if chunk.offset != received or chunk.total_size != expected_total:
                    raise BootFailure("fetch", "sealed model stream out of order")
                received += len(chunk.data)
                if received > expected_total:
                    raise BootFailure("fetch", "sealed model stream longer than announced")
                write(chunk.data)
        except grpc.RpcError as err:
            raise BootFailure("fetch", f"cannot fetch the sealed model ({err.code().name})") from None
        if expected_total is None or received != expected_total:
            raise BootFailure("fetch", "sealed model stream ended early")

    def report(self, state: str, *, reason: str = "", step: str = "") -> None:
        """Best effort: a parent that does not listen cannot stop the enclave from serving or failing."""
        try:
            self._stub.ReportStatus(
                pb.StatusReport(state=pb.StatusReport.State.Value(state), reason=reason, step=step), timeout=5
            )
        except grpc.RpcError as err:
            log.warning("status report %s not delivered (%s)", state, err.code().name)

    def close(self) -> None:
        self._channel.close()
