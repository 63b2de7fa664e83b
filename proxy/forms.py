"""Multipart form bodies (audio transcriptions and other uploads): the `model` field,
so that a key's model allowlist sees the model of every body it lets through."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from proxy.errors import bad_request


def is_form(content_type: str) -> bool:
    return content_type.lower().startswith("multipart/form-data")


def model_field(content_type: str, raw: bytes) -> str | None:
    """The text of the form's `model` field (None where it has none); a body that is
    not the multipart form its Content-Type announces is a 400. The standard
    library's MIME parser reads it: it is strict about boundaries and reports every
    defect, and a form is read once per request."""
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + raw)
    if not isinstance(msg, EmailMessage) or not msg.is_multipart() or msg.defects:
        raise _not_a_form()
    parts = list(msg.iter_parts())
    if not parts:
        raise _not_a_form()
    model: str | None = None
    for part in parts:
        if part.defects:
            raise _not_a_form()
        if part.get_param("name", header="content-disposition") == "model":
            value = part.get_payload(decode=True)
            if not isinstance(value, bytes):
                raise _not_a_form()
            try:
                model = value.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise _not_a_form() from None
    return model


def _not_a_form() -> Exception:
    return bad_request(
        "The request body is not the multipart form its Content-Type announces.",
        code="invalid_form",
    )
