"""The enclave's client of the parent's host services (credentials, sealed model, status reports).

Nothing the parent returns is trusted for more than it is: credentials only let KMS evaluate the key
policy (which demands our attestation anyway); the sealed model is ciphertext that must authenticate under
the released key. The sealed model is received into memory (the enclave has no disk), bounded by the
measured config's ``max_model_bytes``, with offsets and sizes checked chunk by chunk.
"""

from __future__ import annotations

import io
import logging
import tempfile
from typing import BinaryIO

import grpc

from enclave_app.boot import BootFailure
from nitrovault.kms import AwsCredentials
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
#: in-memory spool before the received ciphertext moves to the (RAM-backed, in an enclave) temp dir
SPOOL_BYTES = 64 << 20


class HostClient:
    def __init__(self, target: str, *, max_model_bytes: int, timeout: float = 30.0) -> None:
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

    def sealed_model(self, model_id: str) -> BinaryIO:
        spool: BinaryIO = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - returned
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
                spool.write(chunk.data)
        except grpc.RpcError as err:
            spool.close()
            raise BootFailure("fetch", f"cannot fetch the sealed model ({err.code().name})") from None
        except BootFailure:
            spool.close()
            raise
        if expected_total is None or received != expected_total:
            spool.close()
            raise BootFailure("fetch", "sealed model stream ended early")
        spool.seek(0, io.SEEK_SET)
        return spool

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
