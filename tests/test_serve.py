"""`tunelab serve` on a real socket: two LoRA adapters over one tiny base, concurrent requests answered
as each adapter answers alone, streaming equal to non-streaming, the OpenAI client, OpenAI-style
errors for bad requests, and the token / binding rules."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvicorn

from tests import tiny
from tunelab.artifacts import load
from tunelab.errors import TunelabError
from tunelab.inference.generation import greedy
from tunelab.recipes.serve import check_bind, create_app, load_served

MAX_TOKENS = 10
QUESTIONS = ["what colour is the box?", "what colour is the cup?", "name a colour", "hello"]


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, str]:
    return tiny.lora_adapters(llama_dir, tmp_path_factory.mktemp("adapters"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(llama_dir, adapters):
    srv = Server(create_app(load_served(str(llama_dir), adapters)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alone(llama_dir, adapters) -> dict[str, list[str]]:
    """Each model's greedy replies, loaded on its own (tunelab's batched generation)."""
    out = {}
    for name, path in {"base": str(llama_dir), **adapters}.items():
        model, tok = load(path)
        out[name] = greedy(model, tok, QUESTIONS, max_new_tokens=MAX_TOKENS, chat=True)
    assert len({tuple(v) for v in out.values()}) == 3, "the two adapters and the base must answer differently"
    return out


def chat(server: Server, model: str, question: str, **extra) -> tuple[int, dict]:
    return post(f"{server.url}/v1/chat/completions", {"model": model, "max_tokens": MAX_TOKENS,
                                                       "messages": [{"role": "user", "content": question}], **extra})


def test_models_lists_the_served_names(server, llama_dir):
    with urllib.request.urlopen(f"{server.url}/v1/models") as r:
        ids = [m["id"] for m in json.loads(r.read())["data"]]
    assert set(ids) == {Path(llama_dir).name, "a", "b", "base"}


def test_concurrent_requests_get_what_each_adapter_answers_alone(server, alone):
    jobs = [(name, i) for name in ("a", "b") for i in range(len(QUESTIONS))]  # 8 at once
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: chat(server, job[0], QUESTIONS[job[1]]), jobs))
    for (name, i), (status, body) in zip(jobs, results, strict=True):
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == alone[name][i], (name, i)
        assert body["usage"]["completion_tokens"] <= MAX_TOKENS + 1
    status, body = chat(server, "base", QUESTIONS[0])
    assert body["choices"][0]["message"]["content"] == alone["base"][0]  # adapters off


def test_the_openai_client_talks_to_it_and_a_stream_equals_the_whole(server, alone):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    whole = client.chat.completions.create(model="b", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           max_tokens=MAX_TOKENS)
    assert whole.choices[0].message.content == alone["b"][1]
    parts = client.chat.completions.create(model="b", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           max_tokens=MAX_TOKENS, stream=True)
    chunks = list(parts)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = client.completions.create(model="a", prompt="the box is", max_tokens=5)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="a", prompt="the box is",
                                                                             max_tokens=5, stream=True))
    assert streamed == text.choices[0].text and text.usage.completion_tokens <= 5


def test_a_stop_string_cuts_the_reply(server, alone):
    full = alone["a"][0]
    stop = full[3:6]
    assert stop and stop in full
    status, body = chat(server, "a", QUESTIONS[0], stop=[stop])
    assert status == 200 and body["choices"][0]["message"]["content"] == full[: full.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, status, where", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "a", "messages": []}, 400, "messages"),
    ({"model": "a", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    (b"{not json", 400, None),
])
def test_bad_requests_get_openai_style_errors(server, body, status, where):
    got, payload = post(f"{server.url}/v1/chat/completions", body)
    assert got == status
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in err["message"]
    assert err["param"] == where


def test_a_cross_site_form_post_is_refused(server):
    req = urllib.request.Request(f"{server.url}/v1/chat/completions", data=b"model=a&messages=x",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 415 and "application/json" in json.loads(e.value.read())["error"]["message"]


def test_a_token_is_required_when_set_and_beyond_loopback(llama_dir, adapters):
    with pytest.raises(TunelabError, match="no token is set"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "s3cret")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    srv = Server(create_app(load_served(adapters["a"]), token="s3cret"))
    try:
        body = {"model": Path(adapters["a"]).name, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        status, payload = post(f"{srv.url}/v1/chat/completions", body)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        status, _ = post(f"{srv.url}/v1/chat/completions", body, {"Authorization": "Bearer wrong"})
        assert status == 401
        status, payload = post(f"{srv.url}/v1/chat/completions", body, {"Authorization": "Bearer s3cret"})
        assert status == 200, payload
    finally:
        srv.stop()


def test_adapters_must_share_the_base_and_be_peft(llama_dir, adapters, tmp_path, model_dirs):
    with pytest.raises(TunelabError, match="not a peft adapter"):
        load_served(str(llama_dir), {"x": str(tmp_path)})
    with pytest.raises(TunelabError, match="is taken"):
        load_served(str(llama_dir), {"base": adapters["a"]})
    other = json.loads((Path(adapters["b"]) / "adapter_config.json").read_text())
    moved = tmp_path / "other-base"
    moved.mkdir()
    for f in Path(adapters["b"]).iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    (moved / "adapter_config.json").write_text(json.dumps({**other, "base_model_name_or_path": "elsewhere"}))
    with pytest.raises(TunelabError, match="its base is elsewhere"):
        load_served(adapters["a"], {"c": str(moved)})
