"""Request paths as routing sees them: decoded, dot segments resolved, repeated
slashes merged (what nginx and Envoy do before they route), so that no spelling of
a path reaches a backend, or skips a route's chain, by looking like another."""

from __future__ import annotations

from proxy.errors import bad_request


def normalise(path: str) -> str:
    """The routing path for aiohttp's decoded `request.path` (in which `%2e` is
    already `.` and `%2F` a `/`). A `..` that would climb above the path's first
    segment (`/v1/../admin`) is a 400: no path may leave an upstream's base path."""
    if "//" not in path and "/." not in path:
        return path  # the usual path: nothing to resolve
    out: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment in ("", "."):
            continue
        if segment == "..":
            if len(out) <= 1:
                raise bad_request(
                    "The request path climbs above its root with `..`; send the path "
                    "without dot segments.",
                    code="invalid_path",
                )
            out.pop()
            continue
        out.append(segment)
    trailing = segments[-1] in ("", ".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing else "")
