"""Helpers shared by the tests (no tests here).

- ``inet_diag_answers``: netlink/inet_diag answers built from the uapi layouts, as the
  kernel (or a lying one) would send them.
"""
