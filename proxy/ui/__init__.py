"""The sessions page, GET /ui (scope `admin`): the caller's sessions and their turns,
live as they are recorded, and each upstream's replicas with their state.

- page.py: the route, the page's files and the JSON it reads (/ui/api/...)
- static/: the page itself (HTML, a small script, a style sheet), shipped in the
  package and served as they are: no build step, nothing fetched from elsewhere

The route is contributed by the auth middleware (proxy/middleware/auth.py), which is
also what lets a browser log in: HTTP Basic with the API key as the password, on
these paths only. Without auth there are no keys, hence no page.
"""

from __future__ import annotations

from proxy.ui.page import UI_ROUTE

__all__ = ["UI_ROUTE"]
