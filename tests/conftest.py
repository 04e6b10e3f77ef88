import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "docs" / "examples"


@pytest.fixture(autouse=True)
def user_home(tmp_path, monkeypatch):
    """Point every mta-local path at a fresh folder so tests never touch the real user dir."""
    home = tmp_path / "mta-home"
    monkeypatch.setenv("MTA_LOCAL_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def session_home(tmp_path_factory):
    """A user dir shared by the end-to-end tests, which reuse one enrolled profile."""
    return tmp_path_factory.mktemp("mta-session")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
