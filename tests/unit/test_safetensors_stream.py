"""The streaming safetensors reader and writer against the reference library, and their refusals."""

import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import UserError
from model_formats.safetensors_stream import SafetensorsReader, TensorSpec, write_safetensors

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b.half": torch.randn(7).half(),
    "c.bf16": torch.randn(2, 2, 3).bfloat16(),
    "d.int": torch.arange(5, dtype=torch.int64),
    "e.scalar": torch.tensor(2.5),
    "f.empty": torch.zeros(0, 4),
    "g.bool": torch.tensor([True, False, True]),
}


def _specs(tensors):
    return [TensorSpec(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]


def test_written_file_reads_back_in_the_reference_library(tmp_path):
    path = tmp_path / "out.safetensors"
    write_safetensors(path, _specs(TENSORS), metadata={"ss_network_dim": "4", "note": "é"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"ss_network_dim": "4", "note": "é"}
        for key, value in TENSORS.items():
            assert torch.equal(handle.get_tensor(key), value), key
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert length % 8 == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_reader_reads_reference_files_one_tensor_at_a_time(tmp_path):
    path = tmp_path / "ref.safetensors"
    save_file({k: v for k, v in TENSORS.items() if k != "f.empty"}, str(path), metadata={"x": "1"})
    with SafetensorsReader(path) as reader:
        assert reader.metadata == {"x": "1"}
        assert reader.tensors["c.bf16"].shape == (2, 2, 3)
        for key in reader.tensors:
            assert torch.equal(reader.get(key), TENSORS[key]), key


def test_a_failing_producer_leaves_nothing_behind(tmp_path):
    path = tmp_path / "out.safetensors"

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_safetensors(path, [*_specs(TENSORS), TensorSpec("z", torch.float32, (2,), broken)])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="announced"):
        write_safetensors(path, [TensorSpec("w", torch.float32, (3,), lambda: torch.zeros(2))])


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"abc", "shorter than"),
        (struct.pack("<Q", 200 * 2**20) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (
            struct.pack("<Q", 64) + b'{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'.ljust(64) + b"\0" * 8,
            "truncated",
        ),
        (
            struct.pack("<Q", 64) + b'{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'.ljust(64) + b"\0" * 8,
            "does not fit its shape",
        ),
    ],
)
def test_corrupt_files_are_refused_clearly(tmp_path, content, why):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"corrupt or not a LoRA file: bad.safetensors .*{why}"):
        SafetensorsReader(path)


def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        SafetensorsReader(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        SafetensorsReader(tmp_path)
