"""enclave-agent: the Nitro Enclave's init process that fetches secrets from AWS KMS."""
