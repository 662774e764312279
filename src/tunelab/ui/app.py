"""`tunelab ui`: a local web UI over the run folders under the roots it was given (docs/ui.md).

Pages: runs (status, step, loss, evals), a run (live loss / eval curves polled from metrics.jsonl, its
config, summary and plots), compare reports, data check (`tunelab data check` of a config), start and
stop training, and a chat pane over `tunelab serve`'s app (mounted here when a model is given).
Every path a request names is a ref under a root (paths.py); the guard (security.py) checks host,
token and CSRF; nothing here runs a shell.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from markdown_it import MarkdownIt
from pydantic import BaseModel, ConfigDict

from tunelab import api
from tunelab.data.report import format_check_report
from tunelab.errors import TunelabError
from tunelab.recipes.serve import Served, check_bind, create_app, load_served
from tunelab.ui import runs as runinfo
from tunelab.ui.jobs import NO_GRANTS, Jobs
from tunelab.ui.paths import Refused, Roots, configs, is_compare, is_run
from tunelab.ui.security import COOKIE, Guard, is_loopback

HERE = Path(__file__).parent
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartBody(_Body):
    config: str
    name: str
    root: str | None = None
    resume: bool = False


class RunBody(_Body):
    run: str


class CheckBody(_Body):
    config: str


class LoginBody(_Body):
    token: str


def _one_line(e: TunelabError) -> str:
    return e.message if not e.fix else f"{e.message} (fix: {e.fix})"


def create_ui_app(roots: Roots, *, token: str | None = None, loopback: bool = True,
                  served: Served | None = None) -> FastAPI:
    """The UI over `roots`; with `served`, the chat pane and `tunelab serve`'s /v1 API in the same app."""
    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None)
    guard = Guard(token, loopback)
    jobs = Jobs()
    app.state.guard, app.state.jobs = guard, jobs
    app.middleware("http")(guard)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = _env.get_template(name).render(csrf=guard.csrf, roots=list(roots.by_label), chat=served is not None,
                                              **ctx)
        return HTMLResponse(html, status_code=status)

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused) -> Response:
        if request.url.path.startswith(("/api/", "/file/")):
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return page("error.html", e.status, message=str(e))

    def run_row(path: Path) -> dict[str, Any]:
        row = {"ref": roots.ref(path), **runinfo.summary(path)}
        job = jobs.by_run.get(path)
        if job is not None:
            row["status"] = job.state
        return row

    # ------------------------------------------------------------------ runs

    @app.get("/", response_class=HTMLResponse)
    def runs_page() -> HTMLResponse:
        return page("runs.html", runs=[run_row(p) for p in roots.walk() if is_run(p)])

    @app.get("/api/runs")
    def runs_json() -> list[dict[str, Any]]:
        return [run_row(p) for p in roots.walk() if is_run(p)]

    def run_of(ref: str) -> Path:
        """A run folder, or the folder of a run this UI started that has not written it yet."""
        run = roots.resolve(ref, kind="path")
        if not is_run(run) and run not in jobs.by_run:
            raise Refused(404, f"{ref}: not a run folder (no config.yaml with metrics)")
        return run

    @app.get("/run/{ref:path}", response_class=HTMLResponse)
    def run_page(ref: str) -> HTMLResponse:
        run = run_of(ref)
        images = [roots.ref(p) for p in runinfo.plots(run)]
        job = jobs.by_run.get(run)
        return page("run.html", run=run_row(run), config=runinfo.read_text(run / "config.yaml") or "",
                    summary=runinfo.read_text(run / "summary.json"), images=images, job=job is not None)

    @app.get("/api/metrics/{ref:path}")
    def metrics(ref: str, offset: int = 0) -> dict[str, Any]:
        run = run_of(ref)
        rows, after = runinfo.metrics_after(run, max(0, offset))
        job = jobs.by_run.get(run)
        row = run_row(run)
        return {"rows": rows, "offset": after, "reset": after < offset, "status": row["status"],
                "max_steps": row["max_steps"], "job": job.view(ref) if job else None}

    @app.get("/file/{ref:path}")
    def file(ref: str) -> FileResponse:
        path = roots.resolve(ref, kind="file")
        if path.suffix.lower() != ".png":
            raise Refused(403, f"{ref}: only PNG images are served as files")
        return FileResponse(path, media_type="image/png")

    # ------------------------------------------------------------------ compare reports

    @app.get("/compare", response_class=HTMLResponse)
    def compare_list() -> HTMLResponse:
        found = [{"ref": roots.ref(p), "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(
            (p / "report.md").stat().st_mtime))} for p in roots.walk() if is_compare(p)]
        return page("compare_list.html", reports=found)

    @app.get("/compare/{ref:path}", response_class=HTMLResponse)
    def compare_page(ref: str) -> HTMLResponse:
        folder = roots.resolve(ref, kind="dir")
        if not is_compare(folder):
            raise Refused(404, f"{ref}: not a compare folder (no report.md and results.json)")
        report = _markdown(runinfo.read_text(folder / "report.md") or "", ref)
        return page("compare.html", ref=ref, report=report)

    # ------------------------------------------------------------------ data check, start / stop

    @app.get("/data", response_class=HTMLResponse)
    def data_page() -> HTMLResponse:
        return page("data.html", configs=configs(roots))

    @app.post("/api/data-check", response_class=HTMLResponse)
    def data_check(body: CheckBody) -> HTMLResponse:
        path = roots.resolve(body.config, kind="file")
        try:
            report = api.data_check(str(path), NO_GRANTS)
        except TunelabError as e:
            raise Refused(400, _one_line(e)) from None
        except OSError as e:
            raise Refused(400, f"{e.filename or body.config}: {e.strerror}") from None
        html = _env.get_template("data_report.html").render(report=report, text=format_check_report(report))
        return HTMLResponse(html)

    @app.get("/train", response_class=HTMLResponse)
    def train_page() -> HTMLResponse:
        return page("train.html", configs=configs(roots),
                    jobs=[j.view(roots.ref(r)) for r, j in jobs.by_run.items()])

    @app.post("/api/runs/start")
    def start(body: StartBody) -> dict[str, Any]:
        config = roots.resolve(body.config, kind="file")
        label = body.root or next(iter(roots.by_label))
        if label not in roots.by_label:
            raise Refused(404, f"root {label!r}: roots are {', '.join(roots.by_label)}")
        job = jobs.start(config, roots.by_label[label], body.name, body.resume)
        return job.view(f"{label}/{body.name}")

    @app.post("/api/runs/stop")
    def stop(body: RunBody) -> dict[str, Any]:
        run = roots.resolve(body.run, kind="path")
        return jobs.stop(run).view(body.run)

    # ------------------------------------------------------------------ login, chat

    @app.get("/login", response_class=HTMLResponse)
    def login_page() -> HTMLResponse:
        return page("login.html")

    @app.post("/login")
    def login(body: LoginBody) -> Response:
        if token is None or not guard.has_token_value(body.token):
            return JSONResponse({"error": "wrong token: use the one `tunelab ui --token` was started with"},
                                status_code=401)
        response = JSONResponse({"ok": True})
        response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict")
        return response

    @app.get("/chat", response_class=HTMLResponse)
    def chat_page() -> HTMLResponse:
        return page("chat.html", names=list(served.names) if served else [])

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    if served is not None:  # its /v1 routes, behind the same guard (token and CSRF)
        app.mount("/", create_app(served, None))
    else:
        @app.api_route("/v1/{rest:path}", methods=["GET", "POST"])
        def no_model(rest: str) -> JSONResponse:
            return JSONResponse({"error": {"message": "no model is served: start the UI with --model MODEL "
                                           "(and --adapter NAME=RUN)", "type": "invalid_request_error"}},
                                status_code=404)
    return app


def _markdown(text: str, ref: str) -> str:
    """report.md as HTML (raw HTML in it is escaped); its relative images point at /file/<ref>/..."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for t in tokens:
        for child in t.children or []:
            src = str(child.attrGet("src") or "") if child.type == "image" else ""
            if src and "://" not in src and not src.startswith("/"):
                child.attrSet("src", quote(f"/file/{ref}/{src}"))
    html = md.renderer.render(tokens, md.options, {})
    # the page's Content-Security-Policy allows no inline style: alignment becomes a class
    return re.sub(r' style="text-align:(left|right|center)"', r' class="\1"', html)


def run_ui(folders: list[str], *, host: str = "127.0.0.1", port: int = 8500, token: str | None = None,
           model: str | None = None, adapters: dict[str, str] | None = None, allow_pickle: bool = False,
           trust_remote_code: bool = False, say: Any = print) -> None:
    """Serve the UI until interrupted."""
    check_bind(host, token)
    if adapters and not model:
        raise TunelabError("--adapter needs --model: the base the adapters go over",
                           fix="pass --model BASE (a model dir, run dir, hub id or tunelab-tiny)")
    roots = Roots.of(folders)
    served = load_served(model, adapters, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code) if model else None
    app = create_ui_app(roots, token=token, loopback=is_loopback(host), served=served)
    shown = f"[{host}]" if ":" in host else host
    say(f"tunelab ui on http://{shown}:{port}/ over {', '.join(str(p) for p in roots.by_label.values())}"
        + (" (token required: log in at /login)" if token else ""))
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        app.state.jobs.stop_all()
