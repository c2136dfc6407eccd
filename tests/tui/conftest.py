import pytest


@pytest.fixture
def anyio_backend():
    """Pilot tests are `async def` run by anyio's pytest plugin on asyncio (Textual's loop)."""
    return "asyncio"
