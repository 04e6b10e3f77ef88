import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "docs" / "examples"


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    """Share converted models and F32 copies between tests: they are derived from the base model alone."""
    path = tmp_path_factory.mktemp("mta-cache")
    previous = os.environ.get("MTA_LOCAL_CACHE")
    os.environ["MTA_LOCAL_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("MTA_LOCAL_CACHE", None)
    else:
        os.environ["MTA_LOCAL_CACHE"] = previous


@pytest.fixture(scope="session")
def enrolled_home(tmp_path_factory):
    """Enroll the LaMP-2 example user once per test session through the CLI; return (home, CLI result).

    Enroll takes one to two minutes on 2 CPU cores, so the end-to-end, export and serve tests share
    this profile ("default") and add their own profiles under other names.
    """
    from click.testing import CliRunner

    from mta_local.cli import cli

    home = tmp_path_factory.mktemp("enrolled-home")
    runner = CliRunner(env={"MTA_LOCAL_HOME": str(home)})
    result = runner.invoke(cli, ["enroll", str(EXAMPLES / "lamp2-user-8000029.json"), "--silent"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return home, result


@pytest.fixture(autouse=True)
def user_home(tmp_path, monkeypatch):
    """Point every mta-local path at a fresh folder so tests never touch the real user dir."""
    home = tmp_path / "mta-home"
    monkeypatch.setenv("MTA_LOCAL_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
