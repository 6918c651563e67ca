"""Local AWS KMS stand-in that speaks Recipient (development tooling).

How to run and use it: devtools/local_kms/README.md.
"""
