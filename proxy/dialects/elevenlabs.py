"""ElevenLabs' custom-LLM requests: `elevenlabs_extra_body` (an object, whose
`conversation_id` names the session) and `user_id` are fields a backend would refuse.
They are taken out of the body here, once, whatever middlewares run:
`elevenlabs_extra_body` goes to `Exchange.elevenlabs_extra_body` and its conversation
id to `Exchange.conversation_id`; `user_id` becomes `user` unless `user` is set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.errors import invalid_type, invalid_value

if TYPE_CHECKING:
    from proxy.exchange import Exchange

FIELD = "elevenlabs_extra_body"


def apply(ex: Exchange) -> None:
    """Take the dialect's fields out of a chat body (400 for ones of the wrong type)."""
    body = ex.body
    if body is None:
        return
    if FIELD in body:
        extra = body.pop(FIELD)
        if extra is not None:
            if not isinstance(extra, dict):
                raise invalid_type(FIELD, "an object", extra)
            conversation = extra.get("conversation_id")
            if conversation is not None:
                if not isinstance(conversation, str) or not conversation:
                    raise invalid_value(
                        f"{FIELD}.conversation_id", "a non-empty string", conversation
                    )
                ex.conversation_id = conversation
            ex.elevenlabs_extra_body = extra
    if "user_id" in body:
        user_id = body.pop("user_id")
        if user_id is not None:
            if not isinstance(user_id, str):
                raise invalid_type("user_id", "a string", user_id)
            if body.get("user") is None:
                body["user"] = user_id
