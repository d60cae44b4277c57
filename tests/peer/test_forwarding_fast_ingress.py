"""The forwarding and media-feature tests again, with publisher media on the fast ingress
path (``CASCADE_FAST_INGRESS=1``; the node runs in this process and reads it per receiver)."""

from __future__ import annotations

import pytest

from tests.peer.test_forwarding import *  # noqa: F403
from tests.peer.test_media_features import *  # noqa: F403


@pytest.fixture(autouse=True)
def fast_ingress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_FAST_INGRESS", "1")
