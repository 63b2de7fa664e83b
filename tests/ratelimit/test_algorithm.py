"""The arithmetic shared by both limiters: how a reset time is written."""

from __future__ import annotations

import pytest

from proxy.ratelimit import format_reset


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.0201, "21ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (12.25, "12.25s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (90.5, "1m30.5s"),
        (3723, "1h2m3s"),
    ],
)
def test_reset_format_is_openais(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text
