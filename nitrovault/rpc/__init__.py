"""The gRPC API: ``proto/nitrovault/v1/*.proto`` and the code generated from it.

* ``inference.proto`` — service ``nitrovault.v1.Inference`` (Infer, Embed, Info, Attest), served by the
  enclave and forwarded undecoded by the parent.
* ``host.proto`` — service ``nitrovault.v1.HostServices`` (GetCredentials, FetchSealedModel,
  ReportStatus), offered by the parent to the enclave over vsock. Nothing it returns is trusted.

Generated modules (never edit them; run ``python scripts/gen_protos.py``, and ``--check`` in CI)::

    from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2, inference_pb2_grpc
    from nitrovault.rpc.gen.nitrovault.v1 import host_pb2, host_pb2_grpc

The generated code needs protobuf and grpcio at least as new as the grpcio-tools that produced it
(see the version checks at the top of each generated file).
"""
