"""Shared test fixtures: no network, a private cache, one thread per worker."""

import socket

import pytest
import torch

# Two xdist workers on two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Give every test its own course cache so no test sees another's files."""
    monkeypatch.setenv("TLH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("TLH_STRICT", raising=False)


@pytest.fixture
def no_network(monkeypatch):
    """Make every outgoing connection fail, as on a machine with no network."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
