"""The simulated Nitro Secure Module, for development and tests only."""
