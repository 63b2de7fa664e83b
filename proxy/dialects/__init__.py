"""Request dialects: what a platform adds to the Chat Completions API, turned into the
API itself once, before the chain runs."""
