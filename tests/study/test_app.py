"""The rater app over real HTTP on loopback: escaping, CSRF, the admin page and its exports, rate
limits, arrival links; and the assignment rules checked on the database."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter

from study_helpers import PASSWORD, Client, answer_item, complete_journey, field, live_server, make_study

from distillqa.study.app import create_app  # noqa: E402  (study_helpers skips the module without the extra)
from distillqa.study.store import Store

SCORES = {"plausibility": 4, "understandability": 5, "completeness": 3, "satisfaction": 4, "contrastiveness": 2}
SCRIPT = "<script>alert('x')</script><b onmouseover=\"alert(1)\">bold</b>"


def arrive(client: Client, pid: str = "p1") -> str:
    """Arrive, consent and start; returns the first item page."""
    _, page = client.get(f"/?PROLIFIC_PID={pid}&STUDY_ID=s&SESSION_ID=x")
    _, page = client.post("/consent", {"csrf": field(page, "csrf"), "agree": "yes"})
    status, page = client.post("/instructions", {"csrf": field(page, "csrf")})
    assert status == 200 and client.url.endswith("/item")
    return page


def test_model_text_is_escaped(tmp_path):
    study = make_study(tmp_path, questions=4, explanation=lambda cell, k: f"Because {SCRIPT}", items_per_condition=2,
                       items_per_rater=3)
    with live_server(create_app(study)) as base:
        client = Client(base)
        page = arrive(client)
        with client.opener.open(base + "/item") as resp:
            csp = resp.headers["Content-Security-Policy"]
    body = page.split("<body>", 1)[1]
    assert "Because" in body  # attention checks are never first
    assert "<script" not in body and "<b onmouseover" not in body
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&lt;b onmouseover=&#34;alert(1)&#34;&gt;bold&lt;/b&gt;" in body
    assert "default-src 'none'" in csp and "script-src" not in csp  # no script may run at all


def test_every_form_needs_its_csrf_token(tmp_path):
    study = make_study(tmp_path, questions=4, items_per_condition=2, items_per_rater=3)
    store = Store(study)
    with live_server(create_app(study, store=store)) as base:
        client, other = Client(base), Client(base)
        _, page = client.get("/?PROLIFIC_PID=p1")
        _, other_page = other.get("/?PROLIFIC_PID=p2")
        for data in ({"agree": "yes"}, {"agree": "yes", "csrf": "0" * 32}, {"agree": "yes", "csrf": field(other_page, "csrf")}):
            status, body = client.post("/consent", data)
            assert status == 403 and "did not come from this site" in body
        assert store.raters()[0]["consented"] is None

        page = arrive(client)
        status, _ = client.post("/item", {"assignment": field(page, "assignment"), **SCORES})
        assert status == 403 and store.responses() == []
        assert answer_item(client, page, SCORES)[0] == 200 and len(store.responses()) == 1

        for path, data in (("/instructions", {}), ("/admin/login", {"password": PASSWORD}), ("/admin/logout", {})):
            assert client.post(path, data)[0] == 403, path
        stranger = Client(base)  # a first request with no session cookie at all
        assert stranger.post("/admin/login", {"password": PASSWORD, "csrf": field(page, "csrf")})[0] == 403


def test_admin_password_progress_and_safe_exports(tmp_path):
    study = make_study(tmp_path, questions=6, items_per_condition=3, items_per_rater=3, target_ratings=2)
    with live_server(create_app(study)) as base:
        rater = Client(base)
        page = arrive(rater, "PID-SECRET-1")
        answer_item(rater, page, SCORES, comment='=HYPERLINK("http://evil.example","click")')

        admin = Client(base)
        assert admin.get("/admin/export.csv")[0] == 401
        status, page = admin.get("/admin")
        assert status == 200 and 'type="password"' in page
        status, page = admin.post("/admin/login", {"csrf": field(page, "csrf"), "password": "wrong password"})
        assert status == 401 and "Wrong password." in page
        status, page = admin.post("/admin/login", {"csrf": field(page, "csrf"), "password": PASSWORD})
        assert status == 200 and "Progress per condition" in page and "1 raters arrived" in page
        assert "PID-SECRET-1" not in page
        _, text = admin.get("/admin/export.csv")
        _, exported = admin.get("/admin/export.json")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 1 and "PID-SECRET-1" not in text + exported and "prolific" not in text + exported
    assert re.fullmatch(r"r-[0-9a-f]{16}", rows[0]["rater"]) and rows[0]["rater"] == json.loads(exported)[0]["rater"]
    assert rows[0]["comment"] == '\'=HYPERLINK("http://evil.example","click")'
    assert rows[0]["condition_name"] in {v["name"] for v in study.conditions.values()}


def test_rate_limits(tmp_path):
    study = make_study(tmp_path, questions=4, items_per_condition=2, items_per_rater=3)
    with live_server(create_app(study, rate=0.5, burst=3, login_rate_per_minute=2)) as base:
        client = Client(base)
        assert client.get("/?PROLIFIC_PID=p1")[0] == 200  # the link (no session yet: the address's bucket), then /consent
        assert [client.get("/consent")[0] for _ in range(3)] == [200, 200, 429]  # the session's burst of 3 is spent
    with live_server(create_app(study, login_rate_per_minute=2)) as base:
        admin = Client(base)
        _, page = admin.get("/admin")
        attempts = [admin.post("/admin/login", {"csrf": field(page, "csrf"), "password": "guess"})[0] for _ in range(3)]
        assert attempts == [401, 401, 429]


def test_arrival_links(tmp_path):
    study = make_study(tmp_path, questions=4, items_per_condition=2, items_per_rater=3, tokens=2)
    token = (tmp_path / "study" / "links.txt").read_text().split()[1]
    store = Store(study)
    with live_server(create_app(study, store=store)) as base:
        assert Client(base).get(token)[0] == 200
        assert Client(base).get(token[:-1] + ("0" if token[-1] != "0" else "1"))[0] == 404
        assert Client(base).get("/?PROLIFIC_PID=bad%20id<>")[0] == 400
        status, page = Client(base).get("/?workerId=W1&assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE&hitId=H")
        assert status == 200 and "preview" in page
        mturk = Client(base)
        assert mturk.get("/?workerId=W1&assignmentId=A1&hitId=H")[0] == 200 and mturk.url.endswith("/consent")
        assert Client(base).get("/item")[0] == 401  # no link, no session
    assert sorted(r["external_id"] for r in store.raters()) == ["mturk:W1", "token:2"]


def test_double_submit_is_stored_once(tmp_path):
    study = make_study(tmp_path, questions=4, items_per_condition=2, items_per_rater=3)
    store = Store(study)
    with live_server(create_app(study, store=store)) as base:
        client = Client(base)
        page = arrive(client)
        assert answer_item(client, page, SCORES)[0] == 200
        assert answer_item(client, page, SCORES)[0] == 200  # the same form again (back button, double click)
    assert len(store.responses()) == 1


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_assignment_balances_counterbalances_and_places_checks(tmp_path):
    study = make_study(tmp_path, questions=10, items_per_condition=6, target_ratings=2, items_per_rater=6)
    store = Store(study)
    raters = [store.rater(f"token:{k}")["id"] for k in range(6)]
    for rid in raters:
        assert store.assign(rid) == 6
    with store.connect() as db:
        rows = [dict(r) for r in db.execute("SELECT * FROM assignments ORDER BY rater_id, position")]
    for rid in raters:
        mine = [r for r in rows if r["rater_id"] == rid]
        kinds = [r["kind"] for r in mine]
        assert len(mine) == 8 and kinds.count("check") == 2 and kinds[0] == "item"
        assert "check" in kinds[:4] and "check" in kinds[4:]  # one in each half
        conditions = Counter(study.items[r["item_id"]]["condition"] for r in mine if r["kind"] == "item")
        assert sorted(conditions.values()) == [2, 2, 2]
    per_item = Counter(r["item_id"] for r in rows if r["kind"] == "item")
    assert set(per_item) == set(study.items) and set(per_item.values()) == {2}  # every item at its target, none over
    late = store.rater("token:late")["id"]
    assert store.assign(late) == 0 and store.next_for(late).full


def test_abandoned_items_are_reclaimed_and_never_repeated(tmp_path):
    study = make_study(tmp_path, questions=4, items_per_condition=1, target_ratings=1, items_per_rater=3, timeout_minutes=10)
    clock = Clock()
    store = Store(study, clock=clock)
    first = store.rater("token:1")["id"]
    store.assign(first)
    nxt = store.next_for(first)
    while nxt.item["id"].startswith("check"):
        store.record(first, nxt.assignment_id, {**SCORES, nxt.item["scale"]: nxt.item["value"]}, "")
        nxt = store.next_for(first)
    assert store.record(first, nxt.assignment_id, SCORES, "") == "saved"

    clock.now += 11 * 60  # the first rater walks away; a second one arrives after the timeout
    second = store.rater("token:2")["id"]
    assert store.assign(second) == 2  # the two the first rater left; the one they rated is full
    with store.connect() as db:
        released = {r["item_id"]: r["id"] for r in db.execute("SELECT * FROM assignments WHERE rater_id = ? AND status = 'released'", (first,))}
        given = {r["item_id"] for r in db.execute("SELECT item_id FROM assignments WHERE rater_id = ? AND kind = 'item'", (second,))}
    assert len(released) == 2 and set(released) == given
    for assignment in released.values():  # the first rater comes back too late to rate them
        assert store.record(first, assignment, SCORES, "") == "gone"

    store.next_for(first)  # nothing open is left for them, and they are never given an item they had
    with store.connect() as db:
        mine = [r["item_id"] for r in db.execute("SELECT item_id FROM assignments WHERE rater_id = ?", (first,))]
    assert len(mine) == len(set(mine))


def test_failed_attention_checks_exclude_and_reopen_slots(tmp_path):
    study = make_study(tmp_path, questions=4, items_per_condition=2, target_ratings=1, items_per_rater=6)
    store = Store(study)
    careless = store.rater("token:1")["id"]
    store.assign(careless)
    while not (nxt := store.next_for(careless)).done:
        store.record(careless, nxt.assignment_id, {s: 3 for s in SCORES}, "")  # the midpoint everywhere fails every check
    rater = store.raters()[0]
    assert (rater["failed_checks"], rater["excluded"]) == (2, 1)
    assert store.progress()[0]["rated"] == 0  # excluded ratings count toward no target
    careful = store.rater("token:2")["id"]
    assert store.assign(careful) == 6


def test_whole_journey_over_http_and_resume(tmp_path):
    study = make_study(tmp_path, questions=4, items_per_condition=2, items_per_rater=3)
    with live_server(create_app(study)) as base:
        client = Client(base)
        page = complete_journey(client, "p1")
        assert study.design["completion_code"] in page
        status, page = Client(base).get("/done")
        assert status == 401 and study.design["completion_code"] not in page
        fresh = Client(base)  # the same link in another browser: resumed at the end, code shown again
        assert fresh.get("/?PROLIFIC_PID=p1")[0] == 200 and fresh.url.endswith("/done")


def test_serve_command_serves_the_study(tmp_path):
    """The README's `distillqa study serve` as a process on a loopback port: the landing page answers."""
    study = make_study(tmp_path, questions=4, items_per_condition=2, items_per_rater=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "distillqa.cli", "study", "serve", str(study.path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    page = resp.read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0] if proc.poll() is not None else "timeout"
                time.sleep(0.2)
        assert "Open this study from the link you were given" in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_oversized_and_lengthless_posts_are_refused(tmp_path):
    study = make_study(tmp_path, questions=4, items_per_condition=2, items_per_rater=3)
    with live_server(create_app(study)) as base:
        client = Client(base)
        _, page = client.get("/?PROLIFIC_PID=p1")
        status, _ = client.post("/consent", {"csrf": field(page, "csrf"), "agree": "yes", "comment": "x" * 20_000})
        assert status == 413
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as conn:
            conn.sendall(b"POST /consent HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nagree\r\n0\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 411")
