"""`tunelab ui`: its pages and JSON endpoints over fake run folders (TestClient), every refused attack (paths out
of the roots, cross-site and token-less requests, a foreign Host), data check, chat over two adapters, and a
headless Chromium (Playwright, Debian's /usr/bin/chromium) that watches a curve grow, opens a compare report,
starts and stops a real training run, chats with two adapters and takes the screenshots of docs/ui/."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tests import tiny
from tunelab.errors import TunelabError
from tunelab.recipes.serve import load_served
from tunelab.ui import Roots, create_ui_app, run_ui
from tunelab.ui.paths import Refused

ORIGIN = "http://127.0.0.1"
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "ui"


def _png(path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.4))
    ax.plot([1, 2, 3, 4], [3.0, 1.6, 1.1, 0.9], marker="o")
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)


def _rows(start: int, stop: int, every: int = 5) -> str:
    out = []
    for s in range(start, stop):
        out.append({"step": s, "loss": 3.0 / (1 + 0.1 * s), "lr": 1e-3})
        if s % every == 0:
            out.append({"step": s, "eval_loss": 3.2 / (1 + 0.08 * s), "eval_perplexity": 2.0})
    return "".join(json.dumps(r) + "\n" for r in out)


def _run(root: Path, name: str, rows: str, *, summary: bool = False, ckpt: int | None = None, old: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "lora"}, "train": {"max_steps": 40}}))
    (run / "metrics.jsonl").write_text(rows)
    if summary:
        (run / "summary.json").write_text(json.dumps({"steps": 40, "loss": 0.7, "eval_loss": 0.9}))
        _png(run / "loss.png", name)
    if ckpt is not None:
        (run / "checkpoints" / f"step-{ckpt}").mkdir(parents=True)
    if old:
        then = time.time() - 3600
        for p in (run / "metrics.jsonl", run / "config.yaml", run / "checkpoints"):
            if p.exists():
                os.utime(p, (then, then))
    return run


@pytest.fixture(scope="module")
def tree(tmp_path_factory, llama_dir, chat_data) -> Path:
    """<tmp>/runs: four runs (finished, interrupted, failed, live), a compare report, a config; <tmp>/secret
    outside the root, and links from the root to it."""
    top = tmp_path_factory.mktemp("ui")
    root = top / "runs"
    _run(root, "done", _rows(1, 41), summary=True, ckpt=40)
    _run(root, "stopped", _rows(1, 21), ckpt=20)
    _run(root, "crashed", _rows(1, 15), ckpt=10)
    _run(root, "live", _rows(1, 11), old=False)
    cmp = root / "cmp"
    _png(cmp / "plots" / "qa-cost.png", "qa: score vs cost")
    (cmp / "results.json").write_text("{}")
    (cmp / "report.md").write_text(
        "# Compare: spec.yaml\n\n## qa\n\n| variant | exact_match | trainable |\n|---|---:|---:|\n"
        "| lora | 0.628 ± 0.105 | 376,832 |\n| full | **0.917** | 4,720,896 |\n\n<script>alert(1)</script>\n\n"
        "![qa: score vs cost](plots/qa-cost.png)\n")
    (root / "tiny.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(chat_data[0]), "eval": str(chat_data[1]), "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "train": {"batch_size": 2, "max_steps": 20000, "eval_every": 25, "tensorboard": False, "save_every": 0}}))
    (root / "bad.yaml").write_text("train:\n  lrr: 1\n")
    secret = top / "secret"
    secret.mkdir()
    (secret / "key.png").write_bytes(b"\x89PNG secret")
    (secret / "config.yaml").write_text("secret: 1\n")
    (root / "leak").symlink_to(secret)
    (root / "leak.png").symlink_to(secret / "key.png")
    return root


@pytest.fixture(scope="module")
def app(tree):
    return create_ui_app(Roots.of([str(tree)]))


@pytest.fixture()
def client(app):
    return TestClient(app, base_url=ORIGIN)


def post(client: TestClient, url: str, body: dict, **headers: str):
    return client.post(url, json=body, headers={"x-csrf-token": client.app.state.guard.csrf, "origin": ORIGIN,
                                                **headers})


# ----------------------------------------------------------------------------- pages and endpoints


def test_runs_page_derives_each_status_from_the_run_folder(client):
    runs = {r["ref"]: r for r in client.get("/api/runs").json()}
    assert {k: v["status"] for k, v in runs.items()} == {
        "runs/done": "finished", "runs/stopped": "interrupted", "runs/crashed": "failed", "runs/live": "running"}
    assert runs["runs/done"]["step"] == 40 and runs["runs/done"]["max_steps"] == 40
    assert runs["runs/stopped"]["loss"] == pytest.approx(3.0 / 3.0) and "eval_loss" in runs["runs/stopped"]["eval"]
    page = client.get("/").text
    assert 'href="/run/runs/done"' in page and "interrupted" in page and "runs/leak" not in page


def test_run_page_shows_config_summary_and_plots(client):
    page = client.get("/run/runs/done").text
    assert "max_steps: 40" in page and '&#34;eval_loss&#34;: 0.9' in page and 'src="/file/runs/done/loss.png"' in page
    assert client.get("/file/runs/done/loss.png").content.startswith(b"\x89PNG")
    assert client.get("/file/runs/done/config.yaml").status_code == 403  # images only


def test_metrics_are_polled_after_an_offset_and_a_half_written_line_waits(client, tree):
    first = client.get("/api/metrics/runs/live?offset=0").json()
    assert [r["step"] for r in first["rows"] if "loss" in r] == list(range(1, 11)) and first["status"] == "running"
    with open(tree / "live" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 11, "loss": 0.5}) + "\n" + '{"step": 12, "lo')
    more = client.get(f"/api/metrics/runs/live?offset={first['offset']}").json()
    assert [r["step"] for r in more["rows"]] == [11]
    with open(tree / "live" / "metrics.jsonl", "a") as f:
        f.write('ss": NaN}\n')
    last = client.get(f"/api/metrics/runs/live?offset={more['offset']}").json()
    assert last["rows"] == [{"step": 12, "loss": None}]  # NaN travels as null


def test_compare_report_renders_its_tables_and_plots_and_escapes_html(client):
    assert 'href="/compare/runs/cmp"' in client.get("/compare").text
    page = client.get("/compare/runs/cmp").text
    assert "<table>" in page and '<td class="right">0.628 ± 0.105</td>' in page and "<strong>0.917</strong>" in page
    assert 'src="/file/runs/cmp/plots/qa-cost.png"' in page and "<script>alert" not in page
    assert client.get("/file/runs/cmp/plots/qa-cost.png").status_code == 200


def test_data_check_shows_the_example_with_its_loss_mask(client):
    r = post(client, "/api/data-check", {"config": "runs/tiny.yaml"})
    assert r.status_code == 200, r.text
    assert '<span class="trained">' in r.text and '<span class="masked">' in r.text and "a run would proceed" in r.text
    bad = post(client, "/api/data-check", {"config": "runs/bad.yaml"})
    assert bad.status_code == 400 and "train.lrr: unknown key" in bad.json()["error"]
    assert "\n" not in bad.json()["error"] and "Traceback" not in bad.text


def test_start_refuses_bad_names_and_configs_outside_the_roots(client):
    assert post(client, "/api/runs/start", {"config": "runs/tiny.yaml", "name": "../x"}).status_code == 400
    assert post(client, "/api/runs/start", {"config": "runs/leak/config.yaml", "name": "x"}).status_code == 403
    assert post(client, "/api/runs/stop", {"run": "runs/done"}).status_code == 404  # not started here


# ----------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("url, status", [
    ("/run/runs/%2e%2e/secret", 403),            # encoded ../
    ("/run/runs/..%2fsecret", 403),
    ("/file/runs/%2e%2e/secret/key.png", 403),
    ("/file/runs/%2E%2E%2Fsecret%2Fkey.png", 403),
    ("/run/runs/leak", 403),                     # a link out of the root
    ("/file/runs/leak.png", 403),
    ("/file/runs/leak/key.png", 403),
    ("/api/metrics/runs/leak", 403),
    ("/file//etc/passwd", 404),                  # absolute: no root is named ''
    ("/file/etc/passwd", 404),
    ("/run/runs/%252e%252e/secret", 403),        # double-encoded
    ("/file/runs/%00.png", 403),
])
def test_paths_outside_the_roots_are_refused(client, url, status):
    r = client.get(url)
    assert r.status_code == status, r.text
    assert b"PNG secret" not in r.content and "secret: 1" not in r.text


def test_refs_are_checked_before_any_file_is_read(tree):
    roots = Roots.of([str(tree)])
    for ref in ("runs/../secret", "runs/./../secret/key.png", "runs/leak/key.png", "runs\\..\\secret"):
        with pytest.raises(Refused) as e:
            roots.resolve(ref)
        assert e.value.status == 403, ref
    assert roots.resolve("runs/done/", kind="dir") == (tree / "done").resolve()


def test_posts_need_the_csrf_token_and_this_origin(client):
    body = {"run": "runs/done"}
    no_token = client.post("/api/runs/stop", json=body, headers={"origin": ORIGIN})
    assert no_token.status_code == 403 and "CSRF" in no_token.json()["error"]
    stale = client.post("/api/runs/stop", json=body, headers={"x-csrf-token": "guess", "origin": ORIGIN})
    assert stale.status_code == 403
    assert post(client, "/api/runs/stop", body, origin="http://evil.example").status_code == 403
    assert post(client, "/api/runs/stop", body, origin="null").status_code == 403
    assert post(client, "/api/runs/stop", body, **{"sec-fetch-site": "cross-site"}).status_code == 403
    form = client.post("/api/runs/start", data={"config": "runs/tiny.yaml", "name": "x"},
                       headers={"origin": "http://evil.example"})  # a cross-site HTML form
    assert form.status_code == 403
    assert post(client, "/api/runs/stop", body).status_code == 404  # the guard let it through


def test_a_foreign_host_header_is_refused(app):
    rebound = TestClient(app, base_url="http://evil.example:8500")  # DNS rebinding: evil.example -> 127.0.0.1
    assert rebound.get("/api/runs").status_code == 403
    assert TestClient(app, base_url="http://localhost:8500").get("/api/runs").status_code == 200


def test_binding_beyond_loopback_needs_a_token(tree, capsys):
    with pytest.raises(TunelabError, match="--token"):
        run_ui([str(tree)], host="0.0.0.0")
    from tunelab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ui", "--runs", str(tree), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 2 and "--token" in err
    with pytest.raises(SystemExit) as e:
        main(["ui", "--runs", str(tree / "nope")])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_with_a_token_every_request_carries_it(tree):
    app = create_ui_app(Roots.of([str(tree)]), token="s3cret", loopback=False)
    c = TestClient(app, base_url="http://10.0.0.5:8500")
    assert c.get("/api/runs").status_code == 401
    assert c.get("/", headers={"accept": "text/html"}, follow_redirects=False).headers["location"] == "/login"
    assert c.get("/api/runs", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"authorization": "Bearer s3cret"}).status_code == 200
    csrf = {"x-csrf-token": app.state.guard.csrf, "origin": "http://10.0.0.5:8500"}
    assert c.post("/login", json={"token": "nope"}, headers=csrf).status_code == 401
    assert c.post("/login", json={"token": "s3cret"}, headers={"origin": "http://10.0.0.5:8500"}).status_code == 403
    assert c.post("/login", json={"token": "s3cret"}, headers=csrf).status_code == 200
    assert c.get("/api/runs").status_code == 200  # the cookie


# ----------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, str]:
    return tiny.lora_adapters(llama_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def chat_app(tree, llama_dir, adapters):
    return create_ui_app(Roots.of([str(tree)]), served=load_served(str(llama_dir), adapters))


def test_chat_goes_to_the_mounted_serve_app_behind_the_guard(chat_app):
    c = TestClient(chat_app, base_url=ORIGIN)
    assert {m["id"] for m in c.get("/v1/models").json()["data"]} >= {"a", "b", "base"}
    assert '<option>a</option>' in c.get("/chat").text
    body = {"model": "a", "max_tokens": 5, "messages": [{"role": "user", "content": "hello"}]}
    assert post(c, "/v1/chat/completions", body).json()["choices"][0]["message"]["role"] == "assistant"
    assert c.post("/v1/chat/completions", json=body, headers={"origin": ORIGIN}).status_code == 403


# ----------------------------------------------------------------------------- in a browser


def _grow(run: Path, start: int, stop: int) -> tuple[str, str]:
    """Appends rows; the loss and eval points the chart then draws."""
    with open(run / "metrics.jsonl", "a") as f:
        f.write(_rows(start, stop))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    numbers = [[r for r in rows if isinstance(r.get(k), float) and r[k] == r[k]] for k in ("loss", "eval_loss")]
    return str(len(numbers[0])), str(len(numbers[1]))


@pytest.mark.slow
def test_in_chromium(tree, chat_app, tmp_path):
    """The pages as a user sees them: TUNELAB_UI_SHOTS=docs/ui writes the screenshots of docs/ui.md."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium (apt-get install -y chromium, "
                    "which `make install` runs as root)")
    from playwright.sync_api import expect, sync_playwright

    from tests.test_serve import Server

    shots = Path(os.environ.get("TUNELAB_UI_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    srv = Server(chat_app)
    url = srv.url
    want = {name: post(TestClient(chat_app, base_url=ORIGIN), "/v1/chat/completions", {
        "model": name, "max_tokens": 12, "messages": [{"role": "user", "content": "hello"}]}).json()
        ["choices"][0]["message"]["content"] for name in ("a", "b")}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                        args=["--host-resolver-rules=MAP evil.test 127.0.0.1"])
            page = browser.new_page(viewport={"width": 1000, "height": 620})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            n, _ = _grow(tree / "live", 12, 14)  # fresh: running
            page.goto(url + "/")
            expect(page.locator("tr[data-ref='runs/done'] .status")).to_have_text("finished")
            expect(page.locator("tr[data-ref='runs/live'] .status")).to_have_text("running")
            page.screenshot(path=shots / "runs.png")

            page.click("text=runs/live")
            line = page.locator("#chart polyline.loss")
            expect(line).to_have_attribute("data-n", n)
            n, n_eval = _grow(tree / "live", 14, 40)
            expect(line).to_have_attribute("data-n", n, timeout=15_000)  # the poll picked the new rows up
            expect(page.locator("#chart circle.eval")).to_have_count(int(n_eval))
            page.screenshot(path=shots / "run.png")

            page.goto(url + "/compare")
            page.click("text=runs/cmp")
            expect(page.locator("#report table td.right").first).to_have_text("0.628 ± 0.105")
            page.wait_for_function("() => document.querySelector('#report img').naturalWidth > 0")
            page.screenshot(path=shots / "compare.png", full_page=True)

            page.goto(url + "/data")
            page.fill("input[name=config]", "runs/tiny.yaml")
            page.click("#data-form button")
            expect(page.locator("#data-report span.trained").first).to_be_visible(timeout=120_000)
            page.screenshot(path=shots / "data.png")

            page.goto(url + "/chat")
            for name in ("a", "b"):
                page.click("#clear")
                page.select_option("#model", name)
                page.fill("input[name=max_tokens]", "12")
                page.fill("#content", "hello")
                page.click("#send")
                expect(page.locator(f".msg.assistant[data-model='{name}']")).to_have_text(want[name], timeout=60_000)
            page.screenshot(path=shots / "chat.png")

            page.goto(url + "/train")
            page.fill("input[name=config]", "runs/tiny.yaml")
            page.fill("input[name=name]", "from-ui")
            page.click("#train-form button")
            page.wait_for_url(url + "/run/runs/from-ui")
            page.wait_for_function("() => (document.querySelector('#chart polyline.loss') || {dataset: {n: 0}})"
                                   ".dataset.n >= 3", timeout=240_000)
            expect(page.locator("#status")).to_have_text("running")
            page.screenshot(path=shots / "train.png")
            page.click("#stop")
            expect(page.locator("#status")).to_have_text("interrupted", timeout=120_000)  # SIGTERM: checkpointed
            assert (tree / "from-ui" / "checkpoints").is_dir()

            # attacks, as a browser makes them
            assert page.goto(url + "/file/runs/leak.png").status == 403
            assert page.goto(url + "/file/runs/%2e%2e/secret/key.png").status == 404  # the browser drops the ..:
            # /file/secret/key.png names no root
            page.goto(url + "/")
            no_csrf = page.evaluate("fetch('/api/runs/stop', {method: 'POST', headers: {'Content-Type': 'application/"
                                    "json'}, body: JSON.stringify({run: 'runs/from-ui'})}).then(r => r.status)")
            assert no_csrf == 403
            assert page.goto(f"http://evil.test:{srv.port}/api/runs").status == 403  # DNS rebinding
            evil = (f"<form method=post action='{url}/api/runs/start'><input name=config value=runs/tiny.yaml>"
                    "<input name=name value=evil></form><script>document.forms[0].submit()</script>")
            page.route("http://evil.test/attack", lambda route: route.fulfill(content_type="text/html", body=evil))
            with page.expect_response(f"{url}/api/runs/start") as sent:
                page.goto("http://evil.test/attack")
            assert sent.value.status == 403 and not (tree / "evil").exists()  # a cross-site form POST
            page.route("http://evil.test/read", lambda route: route.fulfill(content_type="text/html", body="<p>x"))
            page.goto("http://evil.test/read")
            read = page.evaluate(f"fetch('{url}/api/runs').then(r => r.text()).catch(e => 'blocked')")
            assert read == "blocked"  # no CORS header: another site cannot read the runs
            assert errors == []
            browser.close()
    finally:
        chat_app.state.jobs.stop_all()
        srv.stop()
