"""Profile folder housekeeping: temporary folders left by processes that died mid-enroll."""

import os
import subprocess
import sys

import pytest

from mta_local.profile import remove_abandoned


@pytest.mark.skipif(os.name != "posix", reason="process ids are checked on POSIX only")
def test_remove_abandoned_keeps_live_folders(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    target = tmp_path / "alice"
    for name in (f".alice.partial-{dead}", f".alice.old-{dead}", f".alice.partial-{os.getpid()}", f".bob.partial-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.json").write_text("{}")

    remove_abandoned(target)

    assert sorted(p.name for p in tmp_path.iterdir()) == [f".alice.partial-{os.getpid()}", f".bob.partial-{dead}"]
