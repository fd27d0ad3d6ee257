"""Fixtures of the scheduler's in-process tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from cascadeinfer.scheduler.coordinator import Coordinator


@pytest.fixture
async def started() -> AsyncIterator[list[Coordinator]]:
    """Coordinators a test starts (`test_coordinator.start`), closed when it ends."""
    coordinators: list[Coordinator] = []
    yield coordinators
    for c in coordinators:
        await c.close()
