"""Pieces shared by enclave-proxy and enclave-agent: the address syntax and log setup."""
