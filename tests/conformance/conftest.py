"""The conformance suite (``procwire.testing``) run over every transport.

Each ``test_<transport>.py`` subclasses ``SyncConformance`` and ``AsyncConformance``; every
test collected here carries the ``conformance`` marker, so ``pytest -m conformance`` runs just
this suite and ``-m "not conformance"`` skips it.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "conformance: the transport conformance suite")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.conformance)
