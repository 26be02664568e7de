"""A Recorder given a symlink to a missing target (`ln -s missing out`) says so, as
`stabledrl record --out` does (test_record.py): before, '... exists and is not a
directory', of a name that names nothing that exists. A file is still not a directory."""

from __future__ import annotations

import pytest

from stabledrl_cli import Recorder
from stabledrl_cli.errors import UsageError


def test_a_recorder_says_the_link_leads_nowhere(tmp_path):
    (tmp_path / "out").symlink_to("missing")
    with pytest.raises(UsageError, match=r"/out is a symlink to missing, which does not exist$"):
        Recorder(tmp_path / "out", unit="sequence")
    assert not (tmp_path / "missing").exists()


def test_a_file_is_still_not_a_directory(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(UsageError, match=r"/out exists and is not a directory$"):
        Recorder(tmp_path / "out", unit="sequence")
