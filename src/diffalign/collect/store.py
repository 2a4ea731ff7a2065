"""The labelling session's durable state: one SQLite file in the collection folder.

Every click is its own transaction, committed with `synchronous=FULL` in WAL mode before the server answers, so a
closed tab, a killed server or a power cut loses at most the click in flight. A pair gets at most one active label
per labeller (a unique index, not a check in Python), so two tabs — or two requests racing — can never write a pair
twice; the loser of a race is told the pair is taken and fetches the next one. Undo deactivates the labeller's
latest label (kept for the record) and the pair returns to the queue.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DB_FILE = "labels.sqlite"
CHOICES = ("left", "right", "tie", "both_bad", "skip")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY, prompt_index INTEGER NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    image TEXT NOT NULL UNIQUE, reward REAL
);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, left_id INTEGER NOT NULL REFERENCES candidates(id),
    right_id INTEGER NOT NULL REFERENCES candidates(id), repeat_of INTEGER REFERENCES pairs(id),
    position REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pair_id INTEGER NOT NULL REFERENCES pairs(id), labeller TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad', 'skip')),
    created_at REAL NOT NULL, active INTEGER NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_label ON labels (pair_id, labeller) WHERE active = 1;
"""


class PairTaken(Exception):
    """This labeller already has an active label on the pair (another tab was first)."""


@dataclass(frozen=True)
class Pair:
    id: int
    prompt: str
    left_image: str
    right_image: str
    repeat_of: int | None


class LabelStore:
    """`folder/labels.sqlite`: candidates, the pair queue and the labels."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / DB_FILE
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection per operation (the server's worker threads never share one); `with db:` blocks
        are transactions."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    # ---- set-up (once per collection) ---------------------------------------------------------------------------
    def settings(self) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        return json.loads(row[0]) if row else None

    def save_settings(self, settings: dict) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (json.dumps(settings, sort_keys=True),))

    def add_candidates(self, rows: list[tuple[int, str, int, str, float | None]]) -> None:
        """`(prompt_index, prompt, seed, image path relative to the folder, reward or None)`; existing images are
        kept as they are."""
        with self._connect() as db, db:
            db.executemany(
                "INSERT OR IGNORE INTO candidates (prompt_index, prompt, seed, image, reward) VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def candidates(self) -> list[sqlite3.Row]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return db.execute("SELECT * FROM candidates ORDER BY prompt_index, seed").fetchall()

    def has_pairs(self) -> bool:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] > 0

    def add_pairs(self, rows: list[tuple[int, int, int | None, float]]) -> None:
        """`(left candidate id, right candidate id, repeat_of pair id or None, queue position)`."""
        with self._connect() as db, db:
            db.executemany("INSERT INTO pairs (left_id, right_id, repeat_of, position) VALUES (?, ?, ?, ?)", rows)

    def image_names(self) -> set[str]:
        with self._connect() as db:
            return {row[0] for row in db.execute("SELECT image FROM candidates")}

    # ---- labelling ----------------------------------------------------------------------------------------------
    def next_pair(self, labeller: str) -> Pair | None:
        """The first pair in queue order that `labeller` has no active label on."""
        with self._connect() as db:
            row = db.execute(
                """SELECT p.id, l.prompt, l.image, r.image, p.repeat_of FROM pairs p
                   JOIN candidates l ON l.id = p.left_id JOIN candidates r ON r.id = p.right_id
                   WHERE NOT EXISTS (SELECT 1 FROM labels x WHERE x.pair_id = p.id AND x.labeller = ? AND x.active = 1)
                   ORDER BY p.position, p.id LIMIT 1""",
                (labeller,),
            ).fetchone()
        return Pair(*row) if row else None

    def label(self, pair_id: int, choice: str, labeller: str) -> None:
        """Record one click durably. Raises `PairTaken` if `labeller` already labelled the pair, `KeyError` for an
        unknown pair, `ValueError` for an unknown choice."""
        if choice not in CHOICES:
            raise ValueError(f"`choice` must be one of {list(CHOICES)}, got {choice!r}")
        with self._connect() as db:
            if db.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                raise KeyError(pair_id)
            try:
                with db:
                    db.execute(
                        "INSERT INTO labels (pair_id, labeller, choice, created_at) VALUES (?, ?, ?, ?)",
                        (pair_id, labeller, choice, time.time()),
                    )
            except sqlite3.IntegrityError:
                raise PairTaken(pair_id) from None

    def undo(self, labeller: str) -> int | None:
        """Deactivate `labeller`'s latest active label; returns its pair id (back in the queue), or None."""
        with self._connect() as db, db:
            row = db.execute(
                "SELECT id, pair_id FROM labels WHERE labeller = ? AND active = 1 ORDER BY id DESC LIMIT 1",
                (labeller,),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE labels SET active = 0 WHERE id = ?", (row[0],))
            return row[1]

    def progress(self, labeller: str) -> dict[str, int]:
        with self._connect() as db:
            total = db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
            done = db.execute("SELECT COUNT(*) FROM labels WHERE labeller = ? AND active = 1", (labeller,)).fetchone()[
                0
            ]
            everyone = db.execute("SELECT COUNT(*) FROM labels WHERE active = 1").fetchone()[0]
        return {"pairs": total, "done": done, "left": total - done, "labels_all_labellers": everyone}

    def labelled(self) -> list[sqlite3.Row]:
        """Every active label with its pair's prompt, images, seeds, rewards and `repeat_of`."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return db.execute(
                """SELECT x.id AS label_id, x.pair_id, x.labeller, x.choice, x.created_at, p.repeat_of,
                          l.prompt, l.image AS left_image, r.image AS right_image, l.seed AS left_seed,
                          r.seed AS right_seed, l.reward AS left_reward, r.reward AS right_reward,
                          p.left_id, p.right_id
                   FROM labels x JOIN pairs p ON p.id = x.pair_id
                   JOIN candidates l ON l.id = p.left_id JOIN candidates r ON r.id = p.right_id
                   WHERE x.active = 1 ORDER BY x.id"""
            ).fetchall()
