"""The owner's side: what the model owner runs and the enclave never does (issuing tokens).

Nothing here enters the measured enclave image (``nitrovault/image.py``).
"""
