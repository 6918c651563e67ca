"""enclave-proxy: the parent-instance daemon that relays the enclave's KMS traffic."""
