"""The identity canary's Lambda code (shipped as an asset; imports only the standard library and boto3)."""
