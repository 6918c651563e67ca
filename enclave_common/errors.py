"""The one error type for "what a caller is shown", shared by both processes.

``ShownError`` carries the three things a caller may see: ``error_type`` (a name in
the callers' vocabulary: KMS's, such as ``ValidationException``, where the callers
are apps), ``message`` and the HTTP ``status``. Each server renders it in the shape
its own callers expect: the agent (and the local KMS) as KMS's JSON error
``{"__type", "message"}`` (``to_json``), the proxy as its ``{"error": message}``.
A message is written for the caller: it never carries a secret or an internal detail.

The app client library (enclave_agent/client.py) imports nothing but the standard
library, so its ``AgentError`` is its own class with the same three fields.
"""

from __future__ import annotations


class ShownError(Exception):
    def __init__(self, error_type: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, str]:
        """KMS's JSON 1.1 error body, the shape AWS SDKs turn into their exceptions."""
        return {"__type": self.error_type, "message": self.message}
