"""The forwarding and media-feature tests again, with publisher media on aiortc's receive
path (``CASCADE_FAST_INGRESS=0``; the node runs in this process and reads it per receiver).
The fast ingress path is the default, tested by the originals."""

from __future__ import annotations

import pytest

from tests.peer.test_forwarding import *  # noqa: F403
from tests.peer.test_media_features import *  # noqa: F403


@pytest.fixture(autouse=True)
def aiortc_ingress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_FAST_INGRESS", "0")
