"""docs/bus.md's API summary names the constructors' parameters as the code has them."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from procwire.bus import AsyncBus, Bus

DOC = (Path(__file__).resolve().parents[2] / "docs" / "bus.md").read_text()


def _documented(cls_name: str) -> list[str]:
    found = re.search(r"^\* `" + cls_name + r"\((.*?)\)`", DOC, re.M | re.S)
    assert found, f"docs/bus.md's API summary has no `{cls_name}(...)` line"
    names = [p.split("=")[0].strip() for p in found.group(1).split(",")]
    return [n for n in names if n and n != "*"]


@pytest.mark.parametrize("cls", [Bus, AsyncBus])
def test_the_api_summary_lists_the_constructor_parameters(cls: type) -> None:
    params = [p for p in inspect.signature(cls).parameters if p != "self"]
    assert _documented(cls.__name__) == params


def test_the_async_bus_connect_timeout_is_where_the_docs_say() -> None:
    assert "timeout" not in inspect.signature(AsyncBus).parameters
    assert inspect.signature(AsyncBus.start).parameters["timeout"].default == 5
    assert "connect timeout is `start(timeout=5)`'s" in " ".join(DOC.split())
