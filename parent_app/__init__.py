"""What runs on the (untrusted) parent instance: the gRPC bridge, host services, enclave supervision.

Never imports ``enclave_app`` or ``nitrovault.local``.
"""
