"""Development tooling (local KMS stand-in, simulated stack). Not shipped in any install."""
