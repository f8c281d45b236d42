"""What runs on the (untrusted) parent instance: the layer-4 relay, health, host services, supervision.

Never imports ``enclave_app`` or ``nitrovault.local``.
"""
