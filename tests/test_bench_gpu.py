"""The GPU benchmark's code path, on CPU with tiny models (`--smoke`): it trains, times and writes its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gpu_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--smoke", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), "--diffusers-script", str(tmp_path / "absent.py")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["LoRA r4", "full"]
    assert all(r["sec_per_step"] > 0 and "error" not in r for r in rows)
    table = (tmp_path / "out" / "bench_gpu.md").read_text()
    assert table.count("| tiny | 16 | 2 |") == 2
