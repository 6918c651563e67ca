"""Operator tools, run outside the enclave: key policies and attestation checks."""
