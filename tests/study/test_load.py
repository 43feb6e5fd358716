"""Load test on loopback: 50 simulated raters complete the study at the same time, then the
database is checked: no rating lost or duplicated, every item at exactly its target, each rater's
conditions counterbalanced. A 51st rater finds the study full."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter

from study_helpers import Client, complete_journey, field, live_server, make_study

from distillqa.study.app import create_app  # noqa: E402  (study_helpers skips the module without the extra)
from distillqa.study.store import Store

RATERS, ITEMS_PER_RATER, TARGET = 50, 12, 10  # 3 conditions x 20 items x 10 ratings = 50 raters x 12 items


def test_fifty_concurrent_raters(tmp_path, capsys):
    study = make_study(tmp_path, questions=24, items_per_condition=20, target_ratings=TARGET, items_per_rater=ITEMS_PER_RATER)
    store = Store(study)
    errors, seconds = [], []
    start = threading.Barrier(RATERS)

    def rater(k: int) -> None:
        client = Client(base)
        start.wait()
        began = time.monotonic()
        try:
            page = complete_journey(client, f"load-{k}")
            assert study.design["completion_code"] in page
        except Exception as e:  # collected: an assertion in a thread would otherwise be lost
            errors.append(f"rater {k}: {e!r}")
        seconds.append(time.monotonic() - began)

    with live_server(create_app(study, store=store)) as base:
        began = time.monotonic()
        threads = [threading.Thread(target=rater, args=(k,)) for k in range(RATERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        wall = time.monotonic() - began
        late = Client(base)
        _, page = late.get("/?PROLIFIC_PID=one-too-many")
        _, page = late.post("/consent", {"csrf": field(page, "csrf"), "agree": "yes"})
        _, page = late.post("/instructions", {"csrf": field(page, "csrf")})
    assert not errors, errors[:3]
    assert "The study is full" in page and study.design["completion_code"] not in page

    responses = store.responses()
    with store.connect() as db:
        assignments = [dict(r) for r in db.execute("SELECT * FROM assignments")]
    items = [r for r in responses if r["kind"] == "item"]
    checks = [r for r in responses if r["kind"] == "check"]
    assert len(items) == RATERS * ITEMS_PER_RATER and len(checks) == RATERS * 2
    assert len({r["assignment_id"] for r in responses}) == len(responses)  # no rating stored twice
    assert len({(r["rater_id"], r["item_id"]) for r in responses}) == len(responses)  # no item twice to a rater
    assert all(a["status"] == "rated" for a in assignments) and len(assignments) == len(responses)  # none lost
    assert Counter(r["item_id"] for r in items) == {item: TARGET for item in study.items}
    for rid in {r["rater_id"] for r in responses}:
        per_condition = Counter(study.items[r["item_id"]]["condition"] for r in items if r["rater_id"] == rid)
        assert sorted(per_condition.values()) == [4, 4, 4]
    raters = store.raters()
    assert sum(bool(r["finished"]) for r in raters) == RATERS and not any(r["excluded"] for r in raters)
    with capsys.disabled():
        print(f"\n[load] {RATERS} raters, {len(responses)} responses ({len(items)} ratings, {len(checks)} checks) in {wall:.1f} s; "
              f"per rater median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s")
