"""core.regular_files: a named file is read only when it is a regular file, and never past its bound."""

import os
import threading

import pytest

from core.regular_files import UnreadableFile, read_bounded


def test_reads_a_regular_file_within_its_bound(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"12345")
    assert read_bounded(path, max_bytes=5) == b"12345"


def test_a_file_over_the_bound_is_refused_as_too_large(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"123456")
    with pytest.raises(UnreadableFile) as caught:
        read_bounded(path, max_bytes=5)
    assert caught.value.too_large


def test_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            read_bounded(fifo, max_bytes=10)
        except UnreadableFile as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert outcome and not outcome[0].too_large and "not a regular file" in str(outcome[0])


@pytest.mark.parametrize("path", ["/dev/zero", "/proc/self"])
def test_devices_and_folders_are_refused(path):
    with pytest.raises(UnreadableFile):
        read_bounded(path, max_bytes=10)


def test_a_missing_file_says_why(tmp_path):
    with pytest.raises(UnreadableFile, match="cannot be read"):
        read_bounded(tmp_path / "nope", max_bytes=10)
