"""Helpers shared by the tests (no tests here).

The rule: a test module imports shared helpers from this package (or fixtures from
``tests/conftest.py``), never from another ``test_*.py`` file, and a file named
``test_*.py`` holds tests of the module it is named after. tests/test_layout.py checks it.

- ``stack``: the real processes (enclave-proxy, the whole devstack) for end-to-end,
  fault, load and hostile tests; log events; leak search.
- ``kms_fakes``: a scripted HTTPS KMS, a CONNECT relay serving credentials, an NSM and
  a recipient without cryptography, for the agent's KMS client alone.
- ``proxy_harness``: enclave-proxy in process on loopback, a CONNECT client,
  small upstream servers, one tunnel through the proxy to one, a resolver seam.
- ``raw_http``: a loopback server that speaks whatever bytes a test writes.
- ``cms_builder``: KMS-shaped envelopes built field by field, to break one field at a time.
- ``openssl_cms``: the OpenSSL CLI as an independent CMS consumer.
- ``inet_diag_answers``: netlink/inet_diag answers built from the uapi layouts, as the
  kernel (or a lying one) would send them.
- ``kms_model``: botocore's KMS service model (the agent's operations table is checked
  against it) and valid requests for every served operation.
- ``local_kms_calls``: signed calls to the local KMS in process, without a server.
- ``fuzzing``: hypothesis helpers for parsers of untrusted bytes (a parse that may
  only refuse with its own error, drawn edits of real bytes).
- ``botocore_oracle``: the request a real botocore client sends (stopped before the
  wire, at a pinned instant), to check our request shapes and signatures against.
"""
