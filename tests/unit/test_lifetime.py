"""lepton.lifetime's port probes, which the launcher's readiness wait and its start-up checks use."""

from __future__ import annotations

import socket

from lepton.lifetime import accepts, port_in_use


def test_accepts_only_while_something_listens():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        port = listening.getsockname()[1]
        assert not accepts("127.0.0.1", port, timeout=1.0)  # bound, not listening: refused
        listening.listen()
        assert accepts("127.0.0.1", port, timeout=1.0)
        assert port_in_use("127.0.0.1", port)
    assert not accepts("127.0.0.1", port, timeout=1.0)
