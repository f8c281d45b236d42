"""The gRPC API: generated code is fresh, every message builds, and a real server serves the stubs."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import timestamp_pb2

from nitrovault.rpc.gen.nitrovault.v1 import host_pb2, host_pb2_grpc, inference_pb2, inference_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_protos.py"


# -- generation ------------------------------------------------------------------------------------


def test_generated_code_matches_protos() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok:")


@pytest.fixture
def gen_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, Path]]:
    """The script, pointed at a scratch copy of the generated tree (the repo is never touched)."""
    spec = importlib.util.spec_from_file_location("gen_protos_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    copy = tmp_path / "gen"
    shutil.copytree(REPO / "nitrovault" / "rpc" / "gen", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(mod, "GEN", copy)
    monkeypatch.setattr(mod, "REPO", tmp_path)
    yield mod, copy


def test_check_detects_edited_file(
    gen_script: tuple[ModuleType, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mod, copy = gen_script
    assert mod.check() == 0
    target = copy / "nitrovault" / "v1" / "inference_pb2.py"
    target.write_text(target.read_text() + "\n# hand edit\n")
    assert mod.check() == 1
    assert "inference_pb2.py" in capsys.readouterr().out


def test_check_detects_missing_file(
    gen_script: tuple[ModuleType, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mod, copy = gen_script
    (copy / "nitrovault" / "v1" / "host_pb2.pyi").unlink()
    assert mod.check() == 1
    assert "host_pb2.pyi is missing" in capsys.readouterr().out


def test_check_detects_stale_file(
    gen_script: tuple[ModuleType, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mod, copy = gen_script
    (copy / "nitrovault" / "v1" / "old_pb2.py").write_text("# its proto was removed\n")
    assert mod.check() == 1
    assert "old_pb2.py is stale" in capsys.readouterr().out


def test_generated_imports_are_package_relative() -> None:
    for name in ("inference_pb2_grpc.py", "host_pb2_grpc.py"):
        text = (REPO / "nitrovault" / "rpc" / "gen" / "nitrovault" / "v1" / name).read_text()
        assert "from nitrovault.v1 import" not in text
        assert "from nitrovault.rpc.gen.nitrovault.v1 import" in text
    assert inference_pb2.Tensor.__module__ == "nitrovault.rpc.gen.nitrovault.v1.inference_pb2"


# -- messages ----------------------------------------------------------------------------------------------


def _sample(field: _descriptor.FieldDescriptor) -> Any:
    t = field.type
    if t in (field.TYPE_STRING,):
        return "s"
    if t == field.TYPE_BYTES:
        return b"\x01\x02"
    if t == field.TYPE_BOOL:
        return True
    if t == field.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if t in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
        return 1.5
    return 7  # every integer type


def _fill(msg: Any) -> None:
    """Set every field (the first member of each oneof) to a non-default value."""
    seen_oneofs: set[str] = set()
    for field in msg.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in seen_oneofs:
                continue
            seen_oneofs.add(oneof.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, val_f = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            getattr(msg, field.name)[_sample(key_f)] = _sample(val_f)
        elif field.message_type is not None:
            sub = getattr(msg, field.name).add() if _is_repeated(field) else getattr(msg, field.name)
            sub.SetInParent()
            if field.message_type.full_name != msg.DESCRIPTOR.full_name:
                _fill(sub)
        elif _is_repeated(field):
            getattr(msg, field.name).append(_sample(field))
        else:
            setattr(msg, field.name, _sample(field))


def _is_repeated(field: _descriptor.FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29; ``label`` is gone in 7
        return bool(field.is_repeated)
    return bool(field.label == field.LABEL_REPEATED)


@pytest.mark.parametrize("module", [inference_pb2, host_pb2], ids=["inference", "host"])
def test_every_message_builds_and_round_trips(module: ModuleType) -> None:
    names = list(module.DESCRIPTOR.message_types_by_name)
    assert names
    for name in names:
        cls = getattr(module, name)
        msg = cls()
        _fill(msg)
        data = msg.SerializeToString(deterministic=True)
        again = cls.FromString(data)
        assert again == msg, name
        if msg.DESCRIPTOR.fields:
            assert data, f"{name} serialized to nothing although every field was set"


def test_services_have_the_agreed_methods() -> None:
    inf = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert {m.name: m.server_streaming for m in inf.methods} == {
        "Infer": False, "Embed": False, "Generate": True, "Info": False, "Attest": False,
    }
    host = host_pb2.DESCRIPTOR.services_by_name["HostServices"]
    assert {m.name: m.server_streaming for m in host.methods} == {
        "GetCredentials": False,
        "FetchSealedModel": True,
        "ReportStatus": False,
        "AuditAppend": False,
        "ReportMetrics": False,
        "Control": True,
    }
    assert inference_pb2.DESCRIPTOR.package == "nitrovault.v1"


def test_infer_request_body_is_a_oneof_with_reserved_numbers() -> None:
    req = inference_pb2.InferRequest(model="m")
    req.inputs.tensors.add(name="x", dtype=inference_pb2.DTYPE_FLOAT32, shape=[1, 2], data=b"\0" * 8)
    assert req.WhichOneof("body") == "inputs"
    req.sealed.key_id = "k"
    assert req.WhichOneof("body") == "sealed"
    assert not req.inputs.tensors  # setting sealed cleared inputs
    fields = inference_pb2.InferRequest.DESCRIPTOR.fields_by_name
    assert fields["sealed"].number == 15
    resp_fields = inference_pb2.InferResponse.DESCRIPTOR.fields_by_name
    assert resp_fields["receipt"].number == 14 and resp_fields["sealed"].number == 15
    assert inference_pb2.EmbedResponse.DESCRIPTOR.fields_by_name["receipt"].number == 14


def test_tensor_carries_little_endian_bytes() -> None:
    import numpy as np

    arr = np.arange(6, dtype="<f4").reshape(2, 3)
    t = inference_pb2.Tensor(name="e", dtype=inference_pb2.DTYPE_FLOAT32, shape=arr.shape, data=arr.tobytes())
    back = inference_pb2.Tensor.FromString(t.SerializeToString())
    out = np.frombuffer(back.data, dtype="<f4").reshape(tuple(back.shape))
    assert (out == arr).all()
    assert inference_pb2.DType.Name(back.dtype) == "DTYPE_FLOAT32"


def test_info_pcrs_map_and_status_enum() -> None:
    info = inference_pb2.InfoResponse(model_id="m", pcrs={0: b"\x11" * 48, 8: b"\x22" * 48})
    back = inference_pb2.InfoResponse.FromString(info.SerializeToString())
    assert dict(back.pcrs) == {0: b"\x11" * 48, 8: b"\x22" * 48}
    S = host_pb2.StatusReport
    assert (S.BOOTING, S.SERVING, S.FAILED) == (1, 2, 3)
    assert S(state=S.FAILED, reason="key release refused", step="key-release").state == S.FAILED
    ts = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    cred = host_pb2.Credentials(access_key_id="AKIA", expiration=ts, region="us-east-1")
    assert host_pb2.Credentials.FromString(cred.SerializeToString()).expiration.seconds == 1_700_000_000


# -- a real gRPC server over a unix socket --------------------------------------------------------------


class _Info(inference_pb2_grpc.InferenceServicer):
    def Info(self, request: Any, context: Any) -> Any:
        return inference_pb2.InfoResponse(
            model_id="demo",
            model_version="1",
            sealed_digest="ab" * 32,
            pcrs={0: b"\x01" * 48},
            enclave_version="0.1.0",
            max_batch=8,
            limits=inference_pb2.Limits(max_request_bytes=1 << 20),
        )


class _Host(host_pb2_grpc.HostServicesServicer):
    def FetchSealedModel(self, request: Any, context: Any) -> Any:
        blob = b"sealed-bytes" * 10
        for off in range(0, len(blob), 50):
            yield host_pb2.Chunk(data=blob[off : off + 50], offset=off, total_size=len(blob))


@pytest.fixture
def grpc_unix() -> Iterator[str]:
    d = tempfile.mkdtemp(dir="/tmp", prefix="nvg")
    path = f"{d}/grpc.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServicer_to_server(_Info(), server)
    host_pb2_grpc.add_HostServicesServicer_to_server(_Host(), server)
    assert server.add_insecure_port(f"unix:{path}") != 0
    server.start()
    try:
        yield f"unix:{path}"
    finally:
        server.stop(grace=None).wait(5)
        shutil.rmtree(d, ignore_errors=True)


def test_grpc_server_serves_info_over_unix_socket(grpc_unix: str) -> None:
    with grpc.insecure_channel(grpc_unix) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        info = stub.Info(inference_pb2.InfoRequest(), timeout=10)
        assert info.model_id == "demo" and info.max_batch == 8
        assert dict(info.pcrs) == {0: b"\x01" * 48}
        assert info.limits.max_request_bytes == 1 << 20
        # the trivial servicer does not implement Infer: the generated base class answers UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(inference_pb2.InferRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_server_streams_sealed_model_chunks(grpc_unix: str) -> None:
    with grpc.insecure_channel(grpc_unix) as channel:
        stub = host_pb2_grpc.HostServicesStub(channel)
        chunks = list(stub.FetchSealedModel(host_pb2.FetchRequest(model_id="demo"), timeout=10))
        assert b"".join(c.data for c in chunks) == b"sealed-bytes" * 10
        assert [c.offset for c in chunks] == [0, 50, 100]
        assert {c.total_size for c in chunks} == {120}
