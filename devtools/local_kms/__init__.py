"""Local AWS KMS stand-in that speaks Recipient (development tooling; see README `local-kms`)."""
