"""The study's database (STUDY/study.sqlite, WAL mode): raters, their assignments, their responses.

Assignment happens in one write transaction (BEGIN IMMEDIATE), so raters arriving together are
served one after another and never take the same open slot. An item's slots are its target
number of ratings; a slot is taken by an assignment that is pending or rated, and given back when
its rater has been idle longer than the timeout (the rater is then given other items on return)
or was excluded by the attention checks (their ratings are kept but not counted).

Rules of a rater's assignment:
- never the same item twice (a UNIQUE constraint, and released items are not given again);
- the conditions counterbalanced: each next item comes from the condition the rater has seen least;
- within a condition, the item with the fewest taken slots first (so every item reaches its
  target together), then one whose question the rater has not seen, then at random;
- the items in a random order per rater, the attention checks placed one in each half, never first.
"""

from __future__ import annotations

import random
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from distillqa.study.design import Study

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
  id INTEGER PRIMARY KEY,
  external_id TEXT NOT NULL UNIQUE,      -- 'prolific:PID', 'mturk:workerId' or 'token:N'
  platform_study TEXT, platform_session TEXT,
  created REAL NOT NULL, last_seen REAL NOT NULL,
  consented REAL, started REAL, finished REAL,
  failed_checks INTEGER NOT NULL DEFAULT 0,
  excluded INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS assignments (
  id INTEGER PRIMARY KEY,
  rater_id INTEGER NOT NULL REFERENCES raters(id),
  item_id TEXT NOT NULL,                 -- an item id or an attention check id
  kind TEXT NOT NULL CHECK (kind IN ('item', 'check')),
  position INTEGER NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('pending', 'rated', 'released')),
  assigned REAL NOT NULL,
  shown REAL,                            -- first displayed to the rater
  UNIQUE (rater_id, item_id)
);
CREATE INDEX IF NOT EXISTS assignments_item ON assignments(item_id, status);
CREATE TABLE IF NOT EXISTS responses (
  assignment_id INTEGER PRIMARY KEY REFERENCES assignments(id),
  rater_id INTEGER NOT NULL, item_id TEXT NOT NULL, kind TEXT NOT NULL,
  plausibility INTEGER NOT NULL, understandability INTEGER NOT NULL, completeness INTEGER NOT NULL,
  satisfaction INTEGER NOT NULL, contrastiveness INTEGER NOT NULL,
  comment TEXT NOT NULL DEFAULT '',
  passed INTEGER,                        -- attention checks only: 1 or 0
  seconds REAL NOT NULL,                 -- from the item's first display to the answer
  submitted REAL NOT NULL
);
"""


@dataclass
class Next:
    """What a rater sees next: an assignment to rate, or why there is none."""

    assignment_id: int | None = None
    item: dict | None = None
    position: int = 0
    total: int = 0
    done: bool = False  # finished: no item left for this rater
    full: bool = False  # the study had no open slot for a rater with nothing rated


class Store:
    def __init__(self, study: Study, path: Path | None = None, clock=time.time):
        self.study, self.clock = study, clock
        self.path = path or study.path / "study.sqlite"
        self.design = study.design
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before anything is read, so its reads stay true until it commits."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # --- raters -------------------------------------------------------------------------------
    def rater(self, external_id: str, platform_study: str = "", platform_session: str = "") -> sqlite3.Row:
        """The rater with this platform id, created on first arrival (reopening the link finds them again)."""
        now = self.clock()
        with self.transaction() as db:
            db.execute("INSERT INTO raters (external_id, platform_study, platform_session, created, last_seen) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT (external_id) DO UPDATE SET last_seen = excluded.last_seen",
                       (external_id, platform_study, platform_session, now, now))
            return db.execute("SELECT * FROM raters WHERE external_id = ?", (external_id,)).fetchone()

    def get_rater(self, rater_id: int) -> sqlite3.Row | None:
        with self.connect() as db:
            return db.execute("SELECT * FROM raters WHERE id = ?", (rater_id,)).fetchone()

    def consent(self, rater_id: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE raters SET consented = COALESCE(consented, ?), last_seen = ? WHERE id = ?",
                       (self.clock(), self.clock(), rater_id))

    # --- assignment ---------------------------------------------------------------------------
    def reclaim(self, db: sqlite3.Connection, now: float) -> int:
        """Give back the pending items of raters idle longer than the timeout; returns how many."""
        cutoff = now - 60 * self.design["timeout_minutes"]
        return db.execute("UPDATE assignments SET status = 'released' WHERE kind = 'item' AND status = 'pending' AND "
                          "rater_id IN (SELECT id FROM raters WHERE last_seen < ? AND finished IS NULL)", (cutoff,)).rowcount

    def assign(self, rater_id: int) -> int:
        """Top the rater up to `items_per_rater` items (and give the attention checks on the first
        call), in one transaction; returns how many items were added."""
        now = self.clock()
        with self.transaction() as db:
            self.reclaim(db, now)
            db.execute("UPDATE raters SET last_seen = ?, started = COALESCE(started, ?) WHERE id = ?", (now, now, rater_id))
            mine = db.execute("SELECT item_id, kind, status, position FROM assignments WHERE rater_id = ?", (rater_id,)).fetchall()
            holding = [a for a in mine if a["kind"] == "item" and a["status"] != "released"]
            need = self.design["items_per_rater"] - len(holding)
            rng = random.Random(f"{self.design['seed']}:{rater_id}:{len(mine)}")
            chosen = self._choose(db, {a["item_id"] for a in mine}, [a["item_id"] for a in holding], need, rng) if need > 0 else []
            rng.shuffle(chosen)
            rows = [(item, "item") for item in chosen]
            if not mine and chosen:  # the first assignment: one check in each part of the list, never first
                checks = rng.sample(sorted(self.study.checks), self.design["attention_checks_per_rater"])
                length = len(rows) + len(checks)
                bounds = [(max(1, k * length // len(checks)), (k + 1) * length // len(checks) - 1) for k in range(len(checks))]
                spots = [rng.randint(lo, max(lo, hi)) for lo, hi in bounds]
                for spot, check in zip(spots, checks):  # ascending spots: each insert leaves the earlier ones in place
                    rows.insert(spot, (check, "check"))
            start = 1 + max((a["position"] for a in mine), default=0)
            db.executemany("INSERT INTO assignments (rater_id, item_id, kind, position, status, assigned) "
                           "VALUES (?, ?, ?, ?, 'pending', ?)",
                           [(rater_id, item, kind, start + k, now) for k, (item, kind) in enumerate(rows)])
            return len(chosen)

    def _choose(self, db: sqlite3.Connection, seen: set[str], holding: list[str], need: int, rng: random.Random) -> list[str]:
        target = self.design["target_ratings"]
        taken = dict(db.execute(
            "SELECT a.item_id, COUNT(*) FROM assignments a JOIN raters r ON r.id = a.rater_id "
            "WHERE a.kind = 'item' AND a.status != 'released' AND r.excluded = 0 GROUP BY a.item_id").fetchall())
        items = self.study.items
        open_items: dict[str, list[str]] = {}
        for item_id, item in items.items():
            if item_id not in seen and taken.get(item_id, 0) < target:
                open_items.setdefault(item["condition"], []).append(item_id)
        per_condition = {c: 0 for c in self.study.conditions}
        for item_id in holding:
            per_condition[items[item_id]["condition"]] += 1
        questions = {items[i]["question_id"] for i in seen if i in items}
        chosen = []
        for _ in range(need):
            available = [c for c in open_items if open_items[c]]
            if not available:
                break
            fewest = min(per_condition[c] for c in available)
            cond = rng.choice(sorted(c for c in available if per_condition[c] == fewest))
            best = min(open_items[cond], key=lambda i: (taken.get(i, 0), items[i]["question_id"] in questions, rng.random()))
            open_items[cond].remove(best)
            chosen.append(best)
            per_condition[cond] += 1
            questions.add(items[best]["question_id"])
        return chosen

    def next_for(self, rater_id: int) -> Next:
        """The rater's next pending item, topping up their assignment first if slots were given back."""
        with self.connect() as db:
            rater = db.execute("SELECT * FROM raters WHERE id = ?", (rater_id,)).fetchone()
            holding = db.execute("SELECT COUNT(*) FROM assignments WHERE rater_id = ? AND kind = 'item' AND status != 'released'",
                                 (rater_id,)).fetchone()[0]
        if rater["finished"] is None and holding < self.design["items_per_rater"]:
            self.assign(rater_id)
        with self.connect() as db:
            mine = db.execute("SELECT * FROM assignments WHERE rater_id = ? AND status != 'released' ORDER BY position",
                              (rater_id,)).fetchall()
            pending = [a for a in mine if a["status"] == "pending"]
            if pending:
                a = pending[0]
                item = self.study.items.get(a["item_id"]) or self.study.checks[a["item_id"]]
                return Next(a["id"], item, len(mine) - len(pending) + 1, len(mine))
            answered = len(mine)
        if answered == 0:
            return Next(full=True)
        with self.transaction() as db:
            db.execute("UPDATE raters SET finished = COALESCE(finished, ?) WHERE id = ?", (self.clock(), rater_id))
        return Next(done=True, position=answered, total=answered)

    # --- responses ----------------------------------------------------------------------------
    def mark_shown(self, assignment_id: int) -> None:
        with self.connect() as db:
            db.execute("UPDATE assignments SET shown = COALESCE(shown, ?) WHERE id = ?", (self.clock(), assignment_id))

    def record(self, rater_id: int, assignment_id: int, scores: dict[str, int], comment: str) -> str:
        """Store one response: 'saved', 'duplicate' (already answered: a double submit) or 'gone'
        (not this rater's pending assignment, e.g. given back after a long pause)."""
        now = self.clock()
        with self.transaction() as db:
            db.execute("UPDATE raters SET last_seen = ? WHERE id = ?", (now, rater_id))
            a = db.execute("SELECT * FROM assignments WHERE id = ? AND rater_id = ?", (assignment_id, rater_id)).fetchone()
            if a is None or a["status"] == "released":
                return "gone"
            if a["status"] == "rated":
                return "duplicate"
            passed = None
            if a["kind"] == "check":
                check = self.study.checks[a["item_id"]]
                passed = int(scores[check["scale"]] == check["value"])
            db.execute("INSERT INTO responses (assignment_id, rater_id, item_id, kind, plausibility, understandability, "
                       "completeness, satisfaction, contrastiveness, comment, passed, seconds, submitted) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (assignment_id, rater_id, a["item_id"], a["kind"], *(scores[s] for s in self.design["scales"]),
                        comment, passed, now - (a["shown"] or a["assigned"]), now))
            db.execute("UPDATE assignments SET status = 'rated' WHERE id = ?", (assignment_id,))
            if passed == 0:
                db.execute("UPDATE raters SET failed_checks = failed_checks + 1, "
                           "excluded = (failed_checks + 1 >= ?) WHERE id = ?", (self.design["exclude_if_failed_checks"], rater_id))
            return "saved"

    # --- what the admin page, the export and the analysis read ----------------------------------
    def progress(self) -> list[dict]:
        """Per condition: items, slots (items x target), valid ratings, pending assignments."""
        with self.connect() as db:
            counts = db.execute(
                "SELECT a.item_id, a.status, COUNT(*) AS n FROM assignments a JOIN raters r ON r.id = a.rater_id "
                "WHERE a.kind = 'item' AND a.status != 'released' AND r.excluded = 0 GROUP BY a.item_id, a.status").fetchall()
        out = {c: {"condition": c, "name": v["name"], "items": 0, "slots": 0, "rated": 0, "pending": 0}
               for c, v in self.study.conditions.items()}
        for item in self.study.items.values():
            out[item["condition"]]["items"] += 1
            out[item["condition"]]["slots"] += self.design["target_ratings"]
        for row in counts:
            out[self.study.items[row["item_id"]]["condition"]][row["status"]] += row["n"]
        return list(out.values())

    def raters(self) -> list[dict]:
        with self.connect() as db:
            rows = db.execute(
                "SELECT r.*, (SELECT COUNT(*) FROM responses s WHERE s.rater_id = r.id AND s.kind = 'item') AS rated, "
                "(SELECT COUNT(*) FROM responses s WHERE s.rater_id = r.id AND s.kind = 'check') AS checks_answered "
                "FROM raters r ORDER BY r.id").fetchall()
        return [dict(r) for r in rows]

    def responses(self) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT s.*, r.external_id, r.excluded FROM responses s JOIN raters r ON r.id = s.rater_id "
                              "ORDER BY s.submitted, s.assignment_id").fetchall()
        return [dict(r) for r in rows]
