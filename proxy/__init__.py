"""chat-proxy: an OpenAI-compatible reverse proxy with a YAML middleware chain."""

__version__ = "0.1.0"
