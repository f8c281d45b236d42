"""nitrovault: serve torch models inside AWS Nitro Enclaves; weights, architecture, outputs stay the owner's.

The shared core. ``enclave_app`` runs inside the enclave, ``parent_app`` on the (untrusted) parent,
``infra`` is the CDK app, and ``nitrovault.local`` holds the local stand-ins (vsock over unix sockets,
a fake NSM, a KMS emulator) that production entry points never import.
"""

__version__ = "0.1.0"
