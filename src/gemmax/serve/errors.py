"""The one error type of the server: whatever a client did wrong (or a limit it hit), in OpenAI's format.

Both the HTTP side and the scheduler thread raise or send these, so they live apart from either.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the client caused (or a limit it hit), answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}



def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 about one request parameter: the most common error, hence the short name."""
    return APIError(400, message, param=param, code=code)
