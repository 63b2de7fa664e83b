"""Automatic sessions: which conversation a chat request belongs to, its record, and
the Sessions API that reads it back.

- options.py: the middleware's options
- digest.py: messages normalised, and the digests a conversation is matched by
- ids.py: the session ids made, accepted and forwarded to the backend
- writer.py: the background writer that takes session writes off the request path
- middleware.py: the `session` middleware type (registered on import of this package)
- api.py: the Sessions API, /v1/sessions
- store/: where sessions live (memory, SQLite, Redis)
"""

from __future__ import annotations

from proxy.sessions import middleware as middleware  # registers the `session` type
