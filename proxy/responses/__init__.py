"""OpenAI's Responses API in front of Chat Completions backends, as pure functions:
the request translated (translate.py), the answer (answer.py) and the stream's
events (events.py). The routes, the response store and the relay that use them are
elsewhere."""

from proxy.responses.answer import messages_after, new_response_id, to_response
from proxy.responses.events import StreamTranslator
from proxy.responses.translate import ChatCall, to_chat, with_history

__all__ = [
    "ChatCall",
    "StreamTranslator",
    "messages_after",
    "new_response_id",
    "to_chat",
    "to_response",
    "with_history",
]
