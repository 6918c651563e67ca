"""The in-enclave agent: everything that runs inside the enclave image."""
