"""The label store of a run: SQLite (WAL) at <run_dir>/labels.sqlite, shared by the trainer's `human` reward (it
publishes rollout images and reads their labels), `tdm-r1 label` (the labelling page) and `tdm-r1 label-sim`.

Tables:
- images(id, epoch, position, prompt, item, png, created): one rollout image, named by a content id (epoch, position
  in the epoch and the PNG's sha256), so a resumed epoch that redraws the same images finds the labels given before;
- labels(image_id, labeller, label, time): one like (1) or dislike (0) per labeller and image, the latest kept;
- history(image_id, labeller, label, time, undone): every labelling action, so `undo` restores the one before;
- labellers(name, token_sha256): who may label, by a token handed to them (only its hash is stored);
- state(key, value): what the trainer is doing (waiting / training, epoch, labels needed), for the page.

Every write is one transaction; the trainer and the page are separate processes on one file, which WAL mode allows
(one writer at a time, readers never blocked). Nothing is ever deleted but by `undo` (the history keeps it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

STORE_FILE = "labels.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, position INTEGER NOT NULL,
    prompt TEXT NOT NULL, item TEXT NOT NULL, png BLOB NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS images_epoch ON images (epoch, position);
CREATE TABLE IF NOT EXISTS labels (image_id TEXT NOT NULL REFERENCES images (id), labeller TEXT NOT NULL,
    label INTEGER NOT NULL CHECK (label IN (0, 1)), time REAL NOT NULL, PRIMARY KEY (image_id, labeller));
CREATE TABLE IF NOT EXISTS history (seq INTEGER PRIMARY KEY AUTOINCREMENT, image_id TEXT NOT NULL,
    labeller TEXT NOT NULL, label INTEGER, time REAL NOT NULL, undone INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS labellers (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class LabelError(ValueError):
    """A labelling request that cannot be applied (unknown image or labeller, a label other than 0 / 1)."""


@dataclass(frozen=True)
class Image:
    id: str
    epoch: int
    position: int
    prompt: str
    item: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def image_id(epoch: int, position: int, png: bytes) -> str:
    """e<epoch>-<position>-<first 12 hex digits of the PNG's sha256>: only [0-9a-z-], never a path."""
    return f"e{epoch:05d}-{position:05d}-{hashlib.sha256(png).hexdigest()[:12]}"


class LabelStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    @classmethod
    def of_run(cls, run_dir: str | Path) -> LabelStore:
        return cls(Path(run_dir) / STORE_FILE)

    def close(self) -> None:
        self.db.close()

    def _tx(self, statements: Iterable[tuple[str, tuple]]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                self.db.execute(sql, args)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- labellers ------------------------------------------------------------------------------------------

    def add_labeller(self, name: str, token: str | None = None) -> str:
        """Register a labeller (or give one a new token); returns the token to hand to them."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise LabelError(f"labeller name {name!r}: 1-64 characters of letters, digits, '-', '_', '.'")
        token = token or secrets.token_urlsafe(24)
        self._tx([("INSERT INTO labellers (name, token_sha256) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                   "token_sha256 = excluded.token_sha256", (name, token_hash(token)))])  # fmt: skip
        return token

    def labeller_of(self, token: str) -> str | None:
        """The labeller a token belongs to (None: no one). The lookup is by the token's hash."""
        row = self.db.execute("SELECT name FROM labellers WHERE token_sha256 = ?", (token_hash(token),)).fetchone()
        return None if row is None else row[0]

    def labellers(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM labellers ORDER BY name")]

    # -- images ---------------------------------------------------------------------------------------------

    def publish(self, epoch: int, start: int, pngs: list[bytes], prompts: list[str], items: list[str]) -> list[str]:
        """Store an epoch's images (positions start, start + 1, ...); an image already there keeps its labels."""
        ids = [image_id(epoch, start + i, png) for i, png in enumerate(pngs)]
        now = time.time()
        sql = ("INSERT OR IGNORE INTO images (id, epoch, position, prompt, item, png, created) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)")  # fmt: skip
        self._tx(
            (sql, (i, epoch, start + k, p, it, sqlite3.Binary(png), now))
            for k, (i, png, p, it) in enumerate(zip(ids, pngs, prompts, items, strict=True))
        )
        return ids

    def images(self, epoch: int | None = None) -> list[Image]:
        """The images of an epoch (default: the newest), in order."""
        if epoch is None:
            epoch = self.latest_epoch()
            if epoch is None:
                return []
        rows = self.db.execute(
            "SELECT id, epoch, position, prompt, item FROM images WHERE epoch = ? ORDER BY position", (epoch,)
        )
        return [Image(*r) for r in rows]

    def latest_epoch(self) -> int | None:
        return self.db.execute("SELECT MAX(epoch) FROM images").fetchone()[0]

    def png(self, image_id: str) -> bytes | None:
        row = self.db.execute("SELECT png FROM images WHERE id = ?", (image_id,)).fetchone()
        return None if row is None else bytes(row[0])

    # -- labels ---------------------------------------------------------------------------------------------

    def label(self, image_id: str, labeller: str, label: int) -> None:
        """A like (1) or dislike (0) of a labeller for an image, replacing their earlier one (kept in the history)."""
        if label not in (0, 1) or isinstance(label, bool):
            raise LabelError(f"label must be 0 (dislike) or 1 (like), got {label!r}")
        if self.db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
            raise LabelError(f"no image {image_id!r}")
        if labeller not in self.labellers():
            raise LabelError(f"no labeller {labeller!r}")
        now = time.time()
        upsert = ("INSERT INTO labels (image_id, labeller, label, time) VALUES (?, ?, ?, ?) ON CONFLICT "
                  "(image_id, labeller) DO UPDATE SET label = excluded.label, time = excluded.time")  # fmt: skip
        record = "INSERT INTO history (image_id, labeller, label, time) VALUES (?, ?, ?, ?)"
        self._tx([(upsert, (image_id, labeller, label, now)), (record, (image_id, labeller, label, now))])

    def undo(self, labeller: str) -> str | None:
        """Take back a labeller's last labelling action: the image gets the label it had before from them (or none).
        Returns the image's id (None: nothing to undo)."""
        row = self.db.execute(
            "SELECT seq, image_id FROM history WHERE labeller = ? AND undone = 0 ORDER BY seq DESC LIMIT 1", (labeller,)
        ).fetchone()
        if row is None:
            return None
        seq, image = row
        before = self.db.execute(
            "SELECT label, time FROM history WHERE labeller = ? AND image_id = ? AND undone = 0 AND seq < ? "
            "ORDER BY seq DESC LIMIT 1",
            (labeller, image, seq),
        ).fetchone()
        steps = [("UPDATE history SET undone = 1 WHERE seq = ?", (seq,))]
        if before is None:
            steps.append(("DELETE FROM labels WHERE image_id = ? AND labeller = ?", (image, labeller)))
        else:
            steps.append(("UPDATE labels SET label = ?, time = ? WHERE image_id = ? AND labeller = ?",
                          (before[0], before[1], image, labeller)))  # fmt: skip
        self._tx(steps)
        return image

    def labels_of(self, labeller: str, epoch: int) -> dict[str, int]:
        """{image id: label} a labeller gave on an epoch's images."""
        rows = self.db.execute(
            "SELECT l.image_id, l.label FROM labels l JOIN images i ON i.id = l.image_id WHERE l.labeller = ? AND "
            "i.epoch = ?",
            (labeller, epoch),
        )
        return dict(rows.fetchall())

    def means(self, ids: list[str]) -> dict[str, float]:
        """{image id: mean label over its labellers} of the ids that have at least one label."""
        out: dict[str, float] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT image_id, AVG(label) FROM labels WHERE image_id IN ({marks}) GROUP BY image_id", chunk
            )
            out |= {i: float(m) for i, m in rows}
        return out

    def progress(self, epoch: int) -> tuple[int, int]:
        """(images of the epoch with at least one label, images of the epoch)."""
        done = self.db.execute(
            "SELECT COUNT(DISTINCT l.image_id) FROM labels l JOIN images i ON i.id = l.image_id WHERE i.epoch = ?",
            (epoch,),
        ).fetchone()[0]
        total = self.db.execute("SELECT COUNT(*) FROM images WHERE epoch = ?", (epoch,)).fetchone()[0]
        return int(done), int(total)

    # -- trainer state --------------------------------------------------------------------------------------

    def set_state(self, **values) -> None:
        self._tx(("INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                  (k, json.dumps(v))) for k, v in values.items())  # fmt: skip

    def state(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM state")}

    # -- export ---------------------------------------------------------------------------------------------

    def export(self, path: str | Path) -> int:
        """Every label (image id, epoch, prompt, labeller, label, time) to a .jsonl or .csv file; returns how many."""
        path = Path(path)
        if path.suffix not in (".jsonl", ".csv"):
            raise LabelError(f"export to {path}: the file must end in .jsonl or .csv")
        rows = self.db.execute(
            "SELECT l.image_id, i.epoch, i.prompt, l.labeller, l.label, l.time FROM labels l JOIN images i "
            "ON i.id = l.image_id ORDER BY i.epoch, i.position, l.labeller"
        ).fetchall()
        keys = ("image_id", "epoch", "prompt", "labeller", "label", "time")
        with open(path, "w", newline="") as f:
            if path.suffix == ".csv":
                w = csv.writer(f)
                w.writerow(keys)
                w.writerows(rows)
            else:
                f.writelines(json.dumps(dict(zip(keys, r, strict=True))) + "\n" for r in rows)
        return len(rows)
