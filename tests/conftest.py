from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ProxyProcess


@pytest.fixture
def counter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "counters"
    path.mkdir()
    return path


@pytest.fixture
def proxy(tmp_path: Path, counter_dir: Path) -> Iterator[ProxyProcess]:
    p = ProxyProcess(tmp_path / "mcproxy.db", env={"FIXTURE_COUNTER_DIR": str(counter_dir)})
    p.start()
    yield p
    p.kill()
