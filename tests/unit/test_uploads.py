"""Photos sent from the browser: copied into the project's source/ folder, nothing else, nowhere else."""

import io
import stat
import struct
import zipfile

import pytest

from core.errors import UserError
from modules.lora_training.dataset.uploads import copy_uploads


def _zip(path, entries: dict, *, links: dict | None = None):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_files_and_zip_entries_are_copied_flat_without_leaving_the_folder(tmp_path):
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "cat.jpg").write_bytes(b"jpeg-bytes")
    (upload / "notes.txt").write_text("not a photo")
    archive = _zip(
        upload / "set.zip",
        {"../../escape.png": b"a", "/abs/root.png": b"b", "deep/dir/cat.jpg": b"c", ".hidden.png": b"d", "x.exe": b"e"},
        links={"link.png": "/etc/passwd"},
    )
    target = tmp_path / "projects" / "p" / "source"
    result = copy_uploads(
        [(upload / "cat.jpg", "cat.jpg"), (upload / "notes.txt", "notes.txt"), (archive, "set.zip")],
        folder=target,
        max_file_bytes=1 << 20,
    )
    assert sorted(result.copied) == ["cat (2).jpg", "cat.jpg", "escape.png", "root.png"]
    assert (target / "cat.jpg").read_bytes() == b"jpeg-bytes" and (target / "cat (2).jpg").read_bytes() == b"c"
    assert _tree(tmp_path) == sorted(
        ["projects", "projects/p", "projects/p/source", *(f"projects/p/source/{n}" for n in result.copied)]
        + ["upload", "upload/cat.jpg", "upload/notes.txt", "upload/set.zip"]
    ), "nothing written outside source/"
    assert result.skipped == {"link or special entry in a .zip": 1, "not an image file": 3}


def test_a_zip_bomb_stops_at_the_size_cap(tmp_path):
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("big.png", b"\0" * (8 << 20))
    (tmp_path / "bomb.zip").write_bytes(bomb.getvalue())
    (tmp_path / "ok.png").write_bytes(b"ok")
    result = copy_uploads(
        [(tmp_path / "bomb.zip", "bomb.zip"), (tmp_path / "ok.png", "ok.png")],
        folder=tmp_path / "source",
        max_file_bytes=1 << 20,
    )
    assert result.copied == ["ok.png"] and result.skipped == {"too large": 1}
    assert _tree(tmp_path / "source") == ["ok.png"], "no partial file left behind"


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"None of the files is a photo.*1 not an image file, 1 unreadable \.zip"):
        copy_uploads(
            [(tmp_path / "broken.zip", "broken.zip"), (tmp_path / "a.txt", "a.txt")],
            folder=tmp_path / "source",
            max_file_bytes=1 << 20,
        )
    with pytest.raises(UserError, match="No files were received"):
        copy_uploads([], folder=tmp_path / "source", max_file_bytes=1)


def _repeated_entry_zip(path, *, copies: int):
    """A zip whose central directory lists one compressed "photo.png" ``copies`` times (all at one local header)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("photo.png", bytes(1 << 16))
    data = buf.getvalue()
    eocd = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", data[eocd + 12 : eocd + 20])
    directory = data[cd_offset : cd_offset + cd_size] * copies
    end = bytearray(data[eocd:])
    struct.pack_into("<HHII", end, 8, copies, copies, len(directory), cd_offset)
    path.write_bytes(data[:cd_offset] + directory + bytes(end))
    return path


def test_a_zip_repeating_one_entry_is_refused_whole(tmp_path):
    archive = _repeated_entry_zip(tmp_path / "evil.zip", copies=20)
    (tmp_path / "ok.png").write_bytes(b"ok")
    result = copy_uploads(
        [(archive, "evil.zip"), (tmp_path / "ok.png", "ok.png")], folder=tmp_path / "source", max_file_bytes=1 << 20
    )
    assert result.copied == ["ok.png"] and result.skipped == {".zip whose entries overlap (damaged or crafted)": 1}


def test_one_upload_writes_at_most_its_total_cap(tmp_path):
    for index in range(5):
        (tmp_path / f"{index}.png").write_bytes(bytes(1000))
    files = [(tmp_path / f"{index}.png", f"{index}.png") for index in range(5)]
    result = copy_uploads(files, folder=tmp_path / "source", max_file_bytes=1 << 20, max_total_bytes=2500)
    assert result.copied == ["0.png", "1.png"] and result.skipped == {"over the limit of 0.0 GB per upload": 3}
    assert sum(p.stat().st_size for p in (tmp_path / "source").iterdir()) == 2000
