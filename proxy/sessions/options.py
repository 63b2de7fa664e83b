"""The session middleware's options, and the header a client names its session in."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from proxy.config import Model

SESSION_HEADER = "X-Session-Id"

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


class SessionOptions(Model):
    store_content: bool = True
    retention_days: float | None = Field(30, gt=0)
    forward_header: str | None = SESSION_HEADER

    @field_validator("forward_header")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not _HEADER_NAME.match(value):
            raise ValueError("must be an HTTP header name")
        return value
