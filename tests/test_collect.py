"""`diffalign collect`: candidates, the durable label store, the API in-process, a killed server, racing tabs,
the export and its quality metrics, and training on the export (issue #19). The page itself in a real browser is
tests/test_collect_browser.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from diffalign.collect.candidates import CollectSettings, plan_pairs, prepare
from diffalign.collect.export import export
from diffalign.collect.store import LabelStore, PairTaken
from diffalign.config import ConfigError

SETTINGS = CollectSettings(model="toy", lora=None, prompts="toy:train", max_prompts=4, per_prompt=2, seed=0,
                           num_inference_steps=2, guidance_scale=3.0, resolution=None, repeat_fraction=0.25,
                           reward="toy")  # fmt: skip


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """4 toy prompts × 2 candidates → 4 pairs + 1 repeat, scored by the toy reward (made once, copied per test)."""
    folder = tmp_path_factory.mktemp("collect") / "labels"
    prepare(folder, SETTINGS)
    return folder


@pytest.fixture
def fresh(collection, tmp_path) -> Path:
    target = tmp_path / "labels"
    shutil.copytree(collection, target)
    return target


def _client(folder, token=None):
    from fastapi.testclient import TestClient

    from diffalign.collect.app import create_app

    return TestClient(create_app(folder, token=token))


def test_candidates_have_recorded_seeds_and_the_queue_has_a_swapped_repeat(fresh):
    store = LabelStore(fresh)
    rows = store.candidates()
    assert len(rows) == 8 and {r["seed"] for r in rows} == {0, 1}
    assert all((fresh / r["image"]).is_file() and r["reward"] is not None for r in rows)
    pairs = plan_pairs(rows, 0.25, 0)
    assert len(pairs) == 5
    (left, right, original, position), = [p for p in pairs if p[2] is not None]  # fmt: skip
    first = pairs[original - 1]
    assert (left, right) == (first[1], first[0]) and position > first[3]  # same images, sides swapped, later


def test_a_restart_reuses_the_images_and_refuses_other_settings(fresh):
    before = {p: p.stat().st_mtime_ns for p in (fresh / "images").rglob("*.png")}
    prepare(fresh, SETTINGS)  # the same command again: nothing regenerated, the queue untouched
    assert {p: p.stat().st_mtime_ns for p in (fresh / "images").rglob("*.png")} == before
    assert LabelStore(fresh).progress("x")["pairs"] == 5
    with pytest.raises(ConfigError, match=r"other settings \(`per_prompt` 2 → 3\)"):
        prepare(fresh, replace(SETTINGS, per_prompt=3))


def test_label_undo_and_the_queue_through_the_api(fresh):
    api = _client(fresh)
    first = api.get("/api/next", params={"labeller": "ann"}).json()
    assert first["progress"] == {"pairs": 5, "done": 0, "left": 5, "labels_all_labellers": 0}
    pair = first["pair"]
    assert api.get(pair["left"]).headers["content-type"] == "image/png"
    assert api.post("/api/label", json={"pair_id": pair["id"], "choice": "left", "labeller": "ann"}).status_code == 200
    taken = api.post("/api/label", json={"pair_id": pair["id"], "choice": "right", "labeller": "ann"})
    assert taken.status_code == 409  # never twice per labeller
    assert api.post("/api/label", json={"pair_id": pair["id"], "choice": "sideways"}).status_code == 400
    assert api.post("/api/label", json={"pair_id": 999, "choice": "left"}).status_code == 404
    second = api.get("/api/next", params={"labeller": "ann"}).json()["pair"]
    assert second["id"] != pair["id"]
    assert api.get("/api/next", params={"labeller": "bob"}).json()["pair"]["id"] == pair["id"]  # bob starts fresh
    assert api.post("/api/undo", json={"labeller": "ann"}).json()["undone"] == pair["id"]
    assert api.get("/api/next", params={"labeller": "ann"}).json()["pair"]["id"] == pair["id"]  # back in the queue
    assert api.post("/api/undo", json={"labeller": "ann"}).json()["undone"] is None


@pytest.mark.parametrize("path", ["../labels.sqlite", "images/../labels.sqlite", "%2e%2e/labels.sqlite",
                                  "/etc/passwd", "images/seed0"])  # fmt: skip
def test_images_route_serves_only_recorded_images(fresh, path):
    assert _client(fresh).get(f"/images/{path}").status_code == 404


def test_a_token_guards_every_route(fresh):
    api = _client(fresh, token="s3cret")
    assert api.get("/").status_code == 401 and api.get("/api/next").status_code == 401
    assert api.get("/api/next", params={"token": "wrong"}).status_code == 401
    assert api.get("/api/next", params={"token": "s3cret"}).status_code == 200
    assert api.get("/api/summary", headers={"X-Token": "s3cret"}).status_code == 200


def test_racing_tabs_never_write_a_pair_twice(fresh):
    store = LabelStore(fresh)

    def click(choice):
        try:
            store.label(1, choice, "ann")
            return "ok"
        except PairTaken:
            return "taken"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(click, ["left", "right"] * 8))
    assert results.count("ok") == 1 and results.count("taken") == 15
    assert len([r for r in store.labelled() if r["pair_id"] == 1]) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(folder: Path, port: int) -> subprocess.Popen:
    code = ("import sys, uvicorn; from diffalign.collect.app import create_app; uvicorn.run(create_app(sys.argv[1]), "
            "host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(port)], stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/summary", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(proc.stderr.read().decode()[-2000:])


def _post(port: int, route: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    return json.loads(urllib.request.urlopen(request, timeout=5).read())


def test_labels_survive_a_killed_server(fresh):
    port = _free_port()
    server = _serve(fresh, port)
    try:
        done = []
        for choice in ("left", "right"):
            pair = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/next?labeller=ann").read())["pair"]
            _post(port, "/api/label", {"pair_id": pair["id"], "choice": choice, "labeller": "ann"})
            done.append(pair["id"])
    finally:
        os.kill(server.pid, signal.SIGKILL)  # no shutdown, no flush: the answer came after the commit
        server.wait()
    labels = LabelStore(fresh).labelled()
    assert [(r["pair_id"], r["choice"]) for r in labels] == list(zip(done, ("left", "right")))
    assert LabelStore(fresh).next_pair("ann").id not in done  # the restarted session resumes, never re-asks


def test_export_schema_quality_and_training_on_it(fresh, tmp_path):
    store = LabelStore(fresh)
    pairs = {p: None for p in range(1, 6)}
    repeat = next(r for r in _pairs(fresh) if r[2] is not None)
    original = repeat[2]
    for pair_id in pairs:
        if pair_id == repeat[0]:
            continue
        store.label(pair_id, "left" if pair_id != 2 else "tie", "ann")
    store.label(repeat[0], "right", "ann")  # the mirror of the original's "left": consistent
    store.label(original, "left", "bob")  # bob agrees with ann on the original pair
    store.label(3 if original != 3 else 4, "both_bad", "bob")
    summary = export(fresh)

    table = pd.read_parquet(fresh / "preferences.parquet")
    assert list(table.columns[:5]) == ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    assert len(table) == 4 + 1  # ann's 4 originals (one tie) + bob's one preference; repeats and both-bad left out
    tie = table[table.pair_id == 2]
    assert (tie.label_0 == 0.5).all() and (tie.label_1 == 0.5).all()  # ties kept as ties
    assert set(table.labeller) == {"ann", "bob"} and table.created_at.str.endswith("+00:00").all()
    kto = pd.read_parquet(fresh / "kto.parquet")
    assert kto.desirable.sum() == 4 and (~kto.desirable).sum() == 4 + 2  # winners, losers, both-bad
    q = summary["quality"]
    assert q["self_consistency"] == {"rate": 1.0, "n": 1}
    assert q["inter_labeller_agreement"] == {"rate": 1.0, "n": 1}
    assert q["reward_agreement"]["n"] >= 4 and 0 <= q["reward_agreement"]["rate"] <= 1
    assert summary["train"].startswith("diffalign train dpo --model toy --data ")

    from diffalign.trainers import DPOTrainer
    from helpers import tiny_config

    cfg = tiny_config(DPOTrainer, "toy", fresh / "preferences.parquet", tmp_path / "run", resolution=32,
                      batch_size=2, max_steps=1)  # fmt: skip
    trainer = DPOTrainer(cfg)
    assert (trainer.train() / "pytorch_lora_weights.safetensors").is_file()
    assert trainer.dataset.stats["kept"] == 4 and trainer.dataset.stats["ties_dropped"] == 1


def _pairs(folder: Path) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(folder / "labels.sqlite") as db:
        return db.execute("SELECT id, position, repeat_of FROM pairs ORDER BY id").fetchall()


def test_export_without_a_collection_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no labels.sqlite: run `diffalign collect serve --out"):
        export(tmp_path)


def test_the_cli_serves_with_a_token_beyond_localhost_and_exports(tmp_path):
    """`collect serve --host 0.0.0.0` generates a token and prints the URL with it; `collect export` prints the
    counts and the training command."""
    import re

    from typer.testing import CliRunner

    from diffalign.cli import app

    port = _free_port()
    cmd = [sys.executable, "-m", "diffalign", "collect", "serve", "--model", "toy", "--prompts", "toy:train",
           "--max_prompts", "2", "--steps", "2", "--out", str(tmp_path / "labels"), "--host", "0.0.0.0", "--port",
           str(port)]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        line = server.stdout.readline()
        assert line.startswith("2 pairs in "), line
        token = re.search(r"\?token=([\w-]+)&labeller=NAME", line).group(1)
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/api/next?token={token}", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{base}/api/next", timeout=5)
        pair = json.loads(urllib.request.urlopen(f"{base}/api/next?token={token}&labeller=cy").read())["pair"]
        body = json.dumps({"pair_id": pair["id"], "choice": "right", "labeller": "cy"}).encode()
        request = urllib.request.Request(f"{base}/api/label?token={token}", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        urllib.request.urlopen(request, timeout=5)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    result = CliRunner().invoke(app, ["collect", "export", str(tmp_path / "labels")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("1 preference rows, 2 KTO rows from 1 labels by cy; agreement between labellers —")
    assert "train: diffalign train dpo --model toy --data" in result.output
