"""Local stand-ins for AWS: a fake Nitro PKI and NSM, a KMS emulator, vsock over unix sockets.

They implement the real interfaces and speak the real wire formats, so production code runs unchanged
through them. ``enclave_app`` and ``parent_app`` never import this package; only composition roots
(``nitrovault local ...``) and tests do.
"""
