"""Study test helpers: rationale-experiment outputs written here, a study made from them, the app served
by uvicorn on a loopback port in a thread, and a stdlib HTTP client that keeps cookies like a browser."""

from __future__ import annotations

import html
import http.cookiejar
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the study extra is not installed (pip install -e '.[study]')")

from distillqa.study.design import ATTENTION_CHECKS, StudyOptions, Study, create_study  # noqa: E402

PASSWORD = "correct horse battery"
CELLS = ("mt_unrevised_seed0", "mt_unrevised_seed1", "cf_unrevised_seed0", "mt-cf_unrevised_seed0")
CHECK_BY_QUESTION = {c["question"]: c for c in ATTENTION_CHECKS}


def write_rationale_experiment(root: Path, questions: int = 30, explanation=None) -> Path:
    """answers/CELL/study.jsonl as `distillqa rationales experiment` writes them (three conditions, one with two seeds)."""
    for cell in CELLS:
        rows = [{"id": f"q{k}", "question": f"Where would you put item number {k}?", "choices": ["in a box", "on a shelf", "in a bag"],
                 "gold": "on a shelf", "predicted": "on a shelf" if k % 3 else None,
                 "explanation": explanation(cell, k) if explanation else f"Explanation {k}: shelves hold things{' of many kinds' * (k % 4)}."}
                for k in range(questions)]
        (root / "answers" / cell).mkdir(parents=True)
        (root / "answers" / cell / "study.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_study(tmp: Path, questions: int = 30, explanation=None, **options) -> Study:
    exp = write_rationale_experiment(tmp / "exp", questions, explanation)
    create_study([str(exp)], tmp / "study", PASSWORD, StudyOptions(**options))
    return Study.load(tmp / "study")


@contextmanager
def live_server(app):
    """The app on 127.0.0.1 at a free port, in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", limit_concurrency=400, backlog=256))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the study server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


class Client:
    """A rater's browser, minus the browser: cookies kept, redirects followed, forms posted."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.url = ""

    def request(self, path: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, headers=headers or {})
        try:
            with self.opener.open(req, timeout=60) as resp:
                self.url = resp.url
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            self.url = e.url
            return e.code, e.read().decode()

    def get(self, path: str) -> tuple[int, str]:
        return self.request(path)

    def post(self, path: str, data: dict) -> tuple[int, str]:
        return self.request(path, data)


def field(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, f"no {name} field in the page"
    return html.unescape(match.group(1))


def shown_question(page: str) -> str:
    return html.unescape(re.search(r'<h1>Question</h1>\s*<div class="box">(.*?)</div>', page, re.S).group(1))


def answer_item(client: Client, page: str, scores: dict[str, int], comment: str = "") -> tuple[int, str]:
    """Post one rating of the item on `page`; an attention check is answered as it asks."""
    check = CHECK_BY_QUESTION.get(shown_question(page))
    if check:
        scores = {**scores, check["scale"]: check["value"]}
    return client.post("/item", {"csrf": field(page, "csrf"), "assignment": field(page, "assignment"), **scores,
                                 "comment": comment})


def complete_journey(client: Client, pid: str, scores: dict[str, int] | None = None) -> str:
    """Arrive as Prolific participant `pid`, consent, read the instructions, rate every item; returns the last page."""
    scores = scores or {"plausibility": 4, "understandability": 5, "completeness": 3, "satisfaction": 4, "contrastiveness": 2}
    status, page = client.get(f"/?PROLIFIC_PID={pid}&STUDY_ID=s1&SESSION_ID=x{pid}")
    assert status == 200 and client.url.endswith("/consent"), (status, client.url)
    status, page = client.post("/consent", {"csrf": field(page, "csrf"), "agree": "yes"})
    assert status == 200 and client.url.endswith("/instructions"), (status, client.url)
    status, page = client.post("/instructions", {"csrf": field(page, "csrf")})
    while client.url.endswith("/item"):
        assert status == 200, (status, page)
        status, page = answer_item(client, page, scores)
    assert status == 200 and client.url.endswith("/done"), (status, client.url, page[:300])
    return page


def simulate_raters(store, effects: dict[str, float], raters: int, careless: int = 0, seed: int = 0) -> None:
    """Raters answering through the store, as the app would record them: each rating is
    3 + the condition's effect (by condition name) + the rater's leniency + the item's difficulty + noise,
    rounded and clipped to 1-5, every scale with its own noise; attention checks answered as asked.
    `careless` more raters answer 3 everywhere (failing every check), first, so their slots reopen."""
    import numpy as np

    rng = np.random.default_rng(seed)
    study = store.study
    difficulty = {item: rng.normal(0, 0.3) for item in study.items}
    for k in range(careless + raters):
        rid = store.rater(f"token:sim{k}")["id"]
        leniency = rng.normal(0, 0.4)
        store.assign(rid)
        while not (nxt := store.next_for(rid)).done and not nxt.full:
            item = nxt.item
            if k < careless:
                scores = {s: 3 for s in study.design["scales"]}
            elif item["id"] in study.checks:
                scores = {s: int(rng.integers(1, 6)) for s in study.design["scales"]} | {item["scale"]: item["value"]}
            else:
                mean = 3 + effects.get(study.conditions[item["condition"]]["name"], 0.0) + leniency + difficulty[item["id"]]
                scores = {s: int(np.clip(np.rint(mean + rng.normal(0, 0.7)), 1, 5)) for s in study.design["scales"]}
            store.record(rid, nxt.assignment_id, scores, "")
