"""`distillqa study serve`: the rater web app and its admin page (FastAPI, Jinja2, SQLite).

A rater arrives by a crowd platform's link (Prolific: ?PROLIFIC_PID=..&STUDY_ID=..&SESSION_ID=..;
MTurk: ?workerId=..&assignmentId=..) or a per-rater token link (/t/TOKEN), gets a signed session
cookie, and goes consent -> instructions -> one item at a time -> completion code. Reopening the
link finds the same rater and continues where they stopped.

Defences: every page is rendered by Jinja2 with autoescaping (model text is untrusted) and served
with a Content-Security-Policy that allows no script at all; every form carries a CSRF token bound
to the signed session cookie; requests are rate-limited per session (per address before one
exists) and admin logins more strictly; request bodies are capped; the admin password is checked
against its scrypt hash; exports carry keyed rater hashes, never platform ids.
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader
from starlette.concurrency import run_in_threadpool

from distillqa.study.design import Study
from distillqa.study.security import RateLimiter, check_password, spreadsheet_safe
from distillqa.study.store import Store

COOKIE = "dq_study"
MAX_BODY = 16 * 1024  # a rating form is a few hundred bytes; a comment is capped below
MAX_COMMENT = 2000
ADMIN_SESSION_SECONDS = 8 * 3600
PLATFORM_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MTURK_PREVIEW = "ASSIGNMENT_ID_NOT_AVAILABLE"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the platform ids in the arrival URL go nowhere else
    "Cache-Control": "no-store",
}

templates = Environment(loader=PackageLoader("distillqa.study", "templates"), autoescape=True)


def export_rows(study: Study, store: Store) -> list[dict]:
    """One row per response, rater ids replaced by keyed hashes."""
    rows = []
    for r in store.responses():
        item = study.items.get(r["item_id"])
        rows.append({"rater": study.keys.rater_hash(r["external_id"]), "rater_excluded": bool(r["excluded"]),
                     "kind": r["kind"], "item": r["item_id"],
                     "condition": item["condition"] if item else "", "condition_name": study.conditions[item["condition"]]["name"] if item else "",
                     **{s: r[s] for s in study.design["scales"]}, "passed_check": r["passed"],
                     "comment": r["comment"], "seconds": round(r["seconds"], 1), "submitted": r["submitted"]})
    return rows


def create_app(study: Study, store: Store | None = None, rate: float = 5.0, burst: float = 60.0,
               login_rate_per_minute: float = 5.0) -> FastAPI:
    store = store or Store(study)
    design = study.design
    keys = study.keys
    limiter = RateLimiter(rate, burst)
    login_limiter = RateLimiter(login_rate_per_minute / 60, login_rate_per_minute)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def page(name: str, request: Request, status: int = 200, **context) -> HTMLResponse:
        session = request.state.session
        body = templates.get_template(name).render(title=design["title"], csrf=keys.csrf_token(session), **context)
        response = HTMLResponse(body, status_code=status)
        if request.state.new_cookie:
            response.set_cookie(COOKIE, session, httponly=True, samesite="lax", secure=request.url.scheme == "https")
        return response

    def go(url: str, request: Request, cookie: str | None = None) -> RedirectResponse:
        response = RedirectResponse(url, status_code=303)
        if cookie:
            response.set_cookie(COOKIE, cookie, httponly=True, samesite="lax", secure=request.url.scheme == "https")
        return response

    @app.middleware("http")
    async def guard(request: Request, call_next):
        session = request.cookies.get(COOKIE)
        value = keys.unsign(session)
        request.state.new_cookie = value is None
        if value is None:  # a visitor: a fresh signed session, so even the first form has a CSRF token
            session = keys.sign(f"v:{secrets.token_hex(8)}")
            value = keys.unsign(session)
        request.state.session, request.state.value = session, value
        client = request.client.host if request.client else "unknown"
        if not limiter.allow(value if not request.state.new_cookie else f"ip:{client}"):
            response = HTMLResponse("Too many requests; wait a moment and reload.", status_code=429,
                                    headers={"Retry-After": str(limiter.retry_after())})
        elif request.method == "POST" and not request.headers.get("content-length", "").isdigit():
            response = HTMLResponse("A length is required.", status_code=411)
        elif request.method == "POST" and int(request.headers["content-length"]) > MAX_BODY:
            response = HTMLResponse("The form is too large.", status_code=413)
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(HTTPException)
    async def error_page(request: Request, exc: HTTPException):
        return page("message.html", request, status=exc.status_code, heading="Sorry", message=exc.detail)

    async def form(request: Request) -> dict:
        """The posted form, after its CSRF token was checked against the session cookie."""
        try:
            data = dict(await request.form(max_files=0, max_fields=20))
        except Exception:  # a body the form parser cannot read is a bad request, not a server error
            raise HTTPException(400, "The form could not be read.") from None
        if request.state.new_cookie or not keys.csrf_ok(request.state.session, data.get("csrf")):
            raise HTTPException(403, "This form has expired or did not come from this site. Go back, reload the page and try again.")
        return data

    def rater_of(request: Request):
        kind, _, ident = request.state.value.partition(":")
        rater = store.get_rater(int(ident)) if kind == "r" and ident.isdigit() else None
        if rater is None:
            raise HTTPException(401, "Open this study from the link you were given on your study platform.")
        return rater

    def resume_url(rater) -> str:
        if rater["finished"]:
            return "/done"
        if rater["started"]:
            return "/item"
        return "/instructions" if rater["consented"] else "/consent"

    async def arrive(request: Request, external_id: str, study_id: str = "", session_id: str = ""):
        rater = await run_in_threadpool(store.rater, external_id, study_id, session_id)
        return go(resume_url(rater), request, cookie=keys.sign(f"r:{rater['id']}"))

    # --- rater pages ------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def landing(request: Request):
        q = request.query_params
        ids = [q.get(k, "") for k in ("PROLIFIC_PID", "STUDY_ID", "SESSION_ID", "workerId", "assignmentId")]
        if any(v and not PLATFORM_ID.fullmatch(v) for v in ids):
            raise HTTPException(400, "The link's participant id is not valid.")
        pid, study_id, session_id, worker, assignment = ids
        if pid:
            return await arrive(request, f"prolific:{pid}", study_id, session_id)
        if assignment == MTURK_PREVIEW:
            return page("message.html", request, heading=design["title"],
                        message="This is a preview. Accept the task to start rating explanations.")
        if worker:
            return await arrive(request, f"mturk:{worker}", q.get("hitId", ""), assignment)
        return page("message.html", request, heading=design["title"],
                    message="Open this study from the link you were given on your study platform.")

    @app.get("/t/{token}")
    async def token_link(request: Request, token: str):
        number = keys.rater_token_number(token)
        if number is None:
            raise HTTPException(404, "This link is not valid. Check that you copied all of it.")
        return await arrive(request, f"token:{number}")

    @app.get("/consent", response_class=HTMLResponse)
    async def consent_page(request: Request):
        rater = await run_in_threadpool(rater_of, request)
        return page("consent.html", request, consented=bool(rater["consented"]))

    @app.post("/consent")
    async def consent(request: Request):
        data = await form(request)
        rater = await run_in_threadpool(rater_of, request)
        if data.get("agree") != "yes":
            return page("message.html", request, heading="Thank you",
                        message="You did not agree to take part, so you will not be asked to rate anything. You may close this page.")
        await run_in_threadpool(store.consent, rater["id"])
        return go("/instructions", request)

    @app.get("/instructions", response_class=HTMLResponse)
    async def instructions(request: Request):
        rater = await run_in_threadpool(rater_of, request)
        if not rater["consented"]:
            return go("/consent", request)
        return page("instructions.html", request, scales=design["scales"], labels=design["scale_labels"],
                    items=design["items_per_rater"], checks=design["attention_checks_per_rater"])

    @app.post("/instructions")
    async def start(request: Request):
        await form(request)
        rater = await run_in_threadpool(rater_of, request)
        if not rater["consented"]:
            return go("/consent", request)
        if not rater["started"]:
            await run_in_threadpool(store.assign, rater["id"])
        return go("/item", request)

    @app.get("/item", response_class=HTMLResponse)
    async def item_page(request: Request):
        rater = await run_in_threadpool(rater_of, request)
        if not rater["started"]:
            return go(resume_url(rater), request)
        nxt = await run_in_threadpool(store.next_for, rater["id"])
        if nxt.full:
            return page("message.html", request, heading="The study is full",
                        message="Every explanation already has all the ratings it needs. Thank you for your interest; "
                                "please return this task on your platform.")
        if nxt.done:
            return go("/done", request)
        await run_in_threadpool(store.mark_shown, nxt.assignment_id)
        return page("item.html", request, item=nxt.item, assignment=nxt.assignment_id, position=nxt.position,
                    total=nxt.total, scales=design["scales"], labels=design["scale_labels"])

    @app.post("/item")
    async def rate_item(request: Request):
        data = await form(request)
        rater = await run_in_threadpool(rater_of, request)
        try:
            assignment = int(data.get("assignment", ""))
            scores = {s: int(data[s]) for s in design["scales"]}
        except (KeyError, ValueError):
            raise HTTPException(400, "Please answer every statement (1 to 5) before going on.") from None
        if not all(1 <= v <= 5 for v in scores.values()):
            raise HTTPException(400, "Every answer must be between 1 and 5.")
        comment = str(data.get("comment", "")).strip()[:MAX_COMMENT]
        await run_in_threadpool(store.record, rater["id"], assignment, scores, comment)
        return go("/item", request)  # saved, a double submit, or an item given back: the next page tells

    @app.get("/done", response_class=HTMLResponse)
    async def done(request: Request):
        rater = await run_in_threadpool(rater_of, request)
        if not rater["finished"]:
            return go(resume_url(rater), request)
        return page("done.html", request, code=design["completion_code"])

    # --- admin ------------------------------------------------------------------------------------
    def is_admin(request: Request) -> bool:
        kind, _, issued = request.state.value.partition(":")
        return kind == "a" and issued.isdigit() and time.time() - int(issued) < ADMIN_SESSION_SECONDS

    def require_admin(request: Request) -> None:
        if not is_admin(request):
            raise HTTPException(401, "Log in on the admin page first.")

    @app.get("/admin", response_class=HTMLResponse)
    async def admin(request: Request):
        if not is_admin(request):
            return page("admin_login.html", request, error=None)
        progress = await run_in_threadpool(store.progress)
        raters = await run_in_threadpool(store.raters)
        for r in raters:
            r["hash"] = keys.rater_hash(r["external_id"])
        return page("admin.html", request, progress=progress, raters=raters, design=design,
                    finished=sum(bool(r["finished"]) for r in raters), excluded=sum(r["excluded"] for r in raters))

    @app.post("/admin/login")
    async def login(request: Request):
        data = await form(request)
        client = request.client.host if request.client else "unknown"
        if not login_limiter.allow(client):
            raise HTTPException(429, "Too many login attempts; wait a minute.")
        ok = await run_in_threadpool(check_password, str(data.get("password", "")), design["admin_password"])
        if not ok:
            return page("admin_login.html", request, status=401, error="Wrong password.")
        return go("/admin", request, cookie=keys.sign(f"a:{int(time.time())}"))

    @app.post("/admin/logout")
    async def logout(request: Request):
        await form(request)
        return go("/admin", request, cookie=keys.sign(f"v:{secrets.token_hex(8)}"))

    @app.get("/admin/export.json")
    async def export_json(request: Request):
        require_admin(request)
        rows = await run_in_threadpool(export_rows, study, store)
        return Response(json.dumps(rows, indent=1, ensure_ascii=False), media_type="application/json",
                        headers={"Content-Disposition": "attachment; filename=ratings.json"})

    @app.get("/admin/export.csv")
    async def export_csv(request: Request):
        require_admin(request)
        rows = await run_in_threadpool(export_rows, study, store)
        out = io.StringIO()
        fields = list(rows[0]) if rows else ["rater", "kind", "item", "condition"]
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": "attachment; filename=ratings.csv"})

    return app


def serve_study(study_dir: str | Path, host: str, port: int, rate: float, burst: float) -> None:
    import uvicorn

    study = Study.load(study_dir)
    app = create_app(study, rate=rate, burst=burst)
    # proxy headers let a TLS reverse proxy on the same host mark requests https (Secure cookies)
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=True)
