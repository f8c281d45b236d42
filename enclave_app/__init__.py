"""What runs inside the Nitro Enclave: boot (attest, release the key, unseal), then serve.

Never imports ``parent_app`` or ``nitrovault.local``: its code is measured into PCR0/PCR2.
"""
