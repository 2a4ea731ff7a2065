"""Read an offline wandb run's `run-*.wandb` file: wandb's `wandb_internal_pb2.Record` protobufs in LevelDB-log
framing (a 7-byte file header, 32 KiB blocks, 7-byte record headers: crc32, little-endian length, type
FULL/FIRST/MIDDLE/LAST). wandb ≥ 0.19 ships no Python reader (its Go core writes the file), so the tests parse it
with wandb's own protobuf classes."""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
FILE_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    """Every `Record` in the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, parts = FILE_HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        parts = payload if kind in (FULL, FIRST) else parts + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def history(path: str | Path) -> list[dict[str, str]]:
    """The logged rows: one `{key: value_json}` per `wandb.log` call."""
    return [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records(path)
            if r.WhichOneof("record_type") == "history"]  # fmt: skip


def config(path: str | Path) -> dict[str, str]:
    """The run's config updates: `{key: value_json}`."""
    out = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "config":
            out.update({u.key: u.value_json for u in r.config.update})
        elif kind == "run":  # a config given to wandb.init travels in the run record
            out.update({u.key: u.value_json for u in r.run.config.update})
    return out


def wait_for_rows(path: str | Path, key: str, count: int, timeout: float = 20.0) -> list[dict[str, str]]:
    """History rows holding `key`, waiting for wandb's core process to flush the file (it writes asynchronously
    and may still be doing so when `run.finish()` returns)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in history(path) if key in r]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)
