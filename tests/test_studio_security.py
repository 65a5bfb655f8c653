"""The studio server as an attacker and a careless client meet it (docs/design.md section 7): requests from other
sites, other host names (DNS rebinding) and non-JSON bodies are refused; huge, deeply nested, short, negative-length
and slow requests are answered or closed promptly; a burst of clients is answered, never reset; clients that go away
cost nothing; every refusal is one JSON line and nothing reaches stderr. Raw sockets and http.client against a real
server on a tiny 2-D run whose folder name is not Latin-1 (downloads must still work)."""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import unquote

import pytest

from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.train import train
from torchdiffusion.studio import Studio, StudioServer
from torchdiffusion.studio import app as studio_app
from torchdiffusion.studio import server as studio_server

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
READ_SECONDS = 1.0  # the server's read deadline in these tests (10 s by default)
NAME = "anneau-données-環"  # a run folder name outside Latin-1
SETTINGS = {"sampler": "ddim", "grid": "", "steps": "2", "seed": "0", "n": "4"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("studio_security") / NAME
    train(config_mod.resolve("ring", ["train.steps=5", "model.hidden=16", "model.depth=1", "train.device=cpu",
                                      "train.ckpt_every=0"]), path, progress=False)
    return path


@pytest.fixture(scope="module")
def server(run):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(studio_server.Handler, "read_seconds", READ_SECONDS)
        srv = StudioServer(Studio.from_run(run), "127.0.0.1", 0)
        srv.start_background()
        yield srv
        srv.stop()


@pytest.fixture(autouse=True)
def quiet_stderr(capfd):
    """Whatever a test sends, the server writes nothing to stderr (no tracebacks, no logging)."""
    yield
    time.sleep(0.05)  # let the handler threads finish
    assert capfd.readouterr().err == ""


def request(server, method: str, path: str, *, host: str | None = None, headers: dict | None = None,
            body: bytes | None = None, length: str | None = None) -> bytes:
    """Raw HTTP/1.1 request bytes (``Host`` is the server's own unless given; ``length`` overrides
    Content-Length)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{server.port}'}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length is not None or body is not None:
        lines.append(f"Content-Length: {length if length is not None else len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def exchange(server, data: bytes, *, wait: float = 10.0, then_close: bool = False) -> tuple[int | None, dict, bytes]:
    """Send ``data`` and read until the server closes (a reset fails the test): status, headers, body; with
    ``then_close`` the client hangs up right after sending."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as s:
        s.sendall(data)
        if then_close:
            return None, {}, b""
        chunks = []
        while c := s.recv(65536):
            chunks.append(c)
    raw = b"".join(chunks)
    if not raw.startswith(b"HTTP/"):  # nothing, or an HTTP/0.9 answer (a body without a status line)
        return None, {}, raw
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def refused(status: int | None, body: bytes, code: int, *words: str) -> None:
    """The answer is ``code`` with exactly one JSON error line naming ``words``."""
    assert status == code, (status, body)
    lines = body.decode().splitlines()
    assert len(lines) == 1, body
    msg = json.loads(lines[0])
    assert msg["type"] == "error" and all(w in msg["message"] for w in words), msg


def origin(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def post(server, settings: dict | None = None, **headers) -> bytes:
    body = json.dumps(settings or SETTINGS).encode()
    hdrs = {"Content-Type": "application/json", "Origin": origin(server), "Sec-Fetch-Site": "same-origin",
            **{k.replace("_", "-"): v for k, v in headers.items()}}
    return request(server, "POST", "/api/generate", headers=hdrs, body=body)


def messages(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


# --- who may ask ---------------------------------------------------------------------------------------------
def test_same_origin_generate_works_and_starts_one_job(server):
    before = server.studio._next_id
    status, headers, body = exchange(server, post(server))
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    assert messages(body)[-1]["type"] == "done"
    assert server.studio._next_id == before + 1


@pytest.mark.parametrize("headers, words", [
    ({"Origin": "http://evil.example"}, ("cross-origin", "evil.example")),
    ({"Origin": "null"}, ("cross-origin",)),
    ({"Origin": "http://127.0.0.1:1"}, ("cross-origin",)),  # another port is another origin
    ({"Origin": None, "Sec-Fetch-Site": "cross-site"}, ("another site",)),
    ({"Origin": None, "Sec-Fetch-Site": "same-site"}, ("another site",)),
])
def test_cross_origin_posts_are_refused_before_any_work(server, headers, words):
    before = server.studio._next_id
    data = post(server)
    for k, v in headers.items():  # replace (or drop) the page's own headers
        data = re.sub(rf"\r\n{k}: [^\r]*".encode(), b"", data)
        if v is not None:
            data = data.replace(b"\r\n\r\n", f"\r\n{k}: {v}\r\n\r\n".encode(), 1)
    status, _, body = exchange(server, data)
    refused(status, body, 403, *words)
    assert server.studio._next_id == before


def test_stop_follows_the_same_rules(server):
    """POST /api/stop: another site can neither stop a job nor send a simple request; the page can."""
    body = b'{"job": null}'
    for hdrs, code in (({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
                       ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403),
                       ({"Content-Type": "text/plain", "Origin": origin(server)}, 415)):
        status, _, answer = exchange(server, request(server, "POST", "/api/stop", headers=hdrs, body=body))
        refused(status, answer, code)
    status, _, answer = exchange(server, request(server, "POST", "/api/stop", headers={
        "Content-Type": "application/json", "Origin": origin(server), "Sec-Fetch-Site": "same-origin"}, body=body))
    assert status == 200 and json.loads(answer) == {"type": "idle", "job": None}
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # a running job: stopped
        s.sendall(post(server, {**SETTINGS, "steps": "2000", "n": "2000"}))
        head = b""
        while b"\n" not in head.partition(b"\r\n\r\n")[2]:
            head += s.recv(4096)
        job = json.loads(head.partition(b"\r\n\r\n")[2].splitlines()[0])
        assert job["type"] == "started"
        status, _, answer = exchange(server, request(server, "POST", "/api/stop", headers={
            "Content-Type": "application/json"}, body=json.dumps({"job": job["job"]}).encode()))
        assert status == 200 and json.loads(answer) == {"type": "stopping", "job": job["job"]}
        rest = head
        while c := s.recv(65536):
            rest += c
    last = messages(rest.partition(b"\r\n\r\n")[2])[-1]
    assert last["type"] == "stopped" and last["step"] < 2000, last


@pytest.mark.parametrize("ctype", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", None])
def test_only_json_bodies_are_accepted(server, ctype):
    """text/plain and form bodies are what a page on another site may send without asking (a "simple request")."""
    before = server.studio._next_id
    data = post(server)
    data = re.sub(rb"\r\nContent-Type: [^\r]*", b"" if ctype is None else f"\r\nContent-Type: {ctype}".encode(),
                  data)
    status, _, body = exchange(server, data)
    refused(status, body, 415, "application/json")
    assert server.studio._next_id == before


@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1:1", "127.0.0.1.evil.example:{port}",
                                  "localhost.:{port}", "[::2]:{port}", ""])
@pytest.mark.parametrize("path", ["/", "/api/info", "/api/scorefield?sigma=1", "/results/r1.png"])
def test_a_foreign_host_is_refused_dns_rebinding(server, host, path):
    """A rebound name reaches this server with the attacker's host name in ``Host``: refused on every route."""
    status, _, body = exchange(server, request(server, "GET", path, host=host.format(port=server.port) or " "))
    refused(status, body, 403, "Host")


def test_a_foreign_host_cannot_start_a_job(server):
    before = server.studio._next_id
    data = post(server).replace(f"Host: 127.0.0.1:{server.port}".encode(), f"Host: evil.example:{server.port}".encode())
    data = data.replace(f"Origin: {origin(server)}".encode(), f"Origin: http://evil.example:{server.port}".encode())
    status, _, body = exchange(server, data)
    refused(status, body, 403, "Host")
    assert server.studio._next_id == before


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"])
def test_its_own_names_are_answered(server, host):
    status, _, body = exchange(server, request(server, "GET", "/api/info", host=host.format(port=server.port)))
    assert status == 200 and json.loads(body)["two_d"] is True


@pytest.mark.parametrize("bind, value, ok", [
    ("127.0.0.1", "127.0.0.1:8000", True), ("127.0.0.1", "localhost:8000", True), ("127.0.0.1", "[::1]:8000", True),
    ("127.0.0.1", "127.0.0.1:8001", False), ("127.0.0.1", "127.0.0.1", False), ("127.0.0.1", "10.0.0.5:8000", False),
    ("127.0.0.1", "evil.example:8000", False), ("127.0.0.1", "localhost.evil.example:8000", False),
    ("::1", "[::1]:8000", True), ("::1", "evil.example:8000", False),
    ("0.0.0.0", "192.168.1.20:8000", True), ("0.0.0.0", "[fe80::1]:8000", True), ("0.0.0.0", "localhost:8000", True),
    ("0.0.0.0", "evil.example:8000", False), ("0.0.0.0", "192.168.1.20:8001", False),
    ("192.168.1.20", "192.168.1.20:8000", True), ("192.168.1.20", "192.168.1.21:8000", False),
    ("192.168.1.20", "evil.example:8000", False), ("127.0.0.1", "127.0.0.1:8000:1", False),
    ("127.0.0.1", "127.0.0.1:+8000", False), ("127.0.0.1", "[::1:8000", False),
])
def test_host_rule_for_each_kind_of_bind(bind, value, ok):
    """Loopback binds answer loopback names; wildcard binds any IP literal (never rebound by DNS) and the machine's
    own names; another address only itself; always on the bound port."""
    assert studio_server.host_allowed(value, bind, 8000) is ok


def test_reading_routes_refuse_other_sites_but_the_page_opens_from_a_link(server):
    for hdrs in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}):
        for path in ("/api/info", "/api/scorefield?sigma=1", "/results/r1.png", "/results/r1.npz"):
            status, _, body = exchange(server, request(server, "GET", path, headers=hdrs))
            refused(status, body, 403)
    # following a link from another site opens the page (it can read nothing of it) ...
    status, headers, body = exchange(server, request(server, "GET", "/", headers={
        "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}))
    assert status == 200 and b'data-testid="generate"' in body
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]  # ... but never inside another's frame
    status, _, body = exchange(server, request(server, "GET", "/api/info", headers={"Sec-Fetch-Site": "same-origin"}))
    assert status == 200


# --- what a request may be -----------------------------------------------------------------------------------
def test_bad_lengths_are_answered_promptly(server):
    t0 = time.monotonic()
    hdrs = {"Content-Type": "application/json"}
    status, _, body = exchange(server, request(server, "POST", "/api/generate", headers=hdrs, length="-1"))
    refused(status, body, 400, "Content-Length")
    status, _, body = exchange(server, request(server, "POST", "/api/generate", headers=hdrs, length="1e3"))
    refused(status, body, 400, "Content-Length")
    status, _, body = exchange(server, request(server, "POST", "/api/generate", headers=hdrs))
    refused(status, body, 411, "Content-Length")
    status, _, body = exchange(server, request(server, "POST", "/api/generate", headers={
        **hdrs, "Transfer-Encoding": "chunked"}) + b"2\r\n{}\r\n0\r\n\r\n")
    refused(status, body, 411, "chunked")
    assert time.monotonic() - t0 < 3


def test_a_huge_body_is_refused_without_a_reset(server):
    before = server.studio._next_id
    t0 = time.monotonic()  # announced only
    status, _, body = exchange(server, request(server, "POST", "/api/generate",
                                               headers={"Content-Type": "application/json"}, length=str(10**9)))
    refused(status, body, 413, str(studio_server.MAX_BODY))
    big = json.dumps({**SETTINGS, "pad": "x" * 1_000_000}).encode()  # and sent: the answer still arrives
    status, _, body = exchange(server, request(server, "POST", "/api/generate",
                                               headers={"Content-Type": "application/json"}, body=big))
    refused(status, body, 413)
    assert time.monotonic() - t0 < 5 and server.studio._next_id == before


def test_deeply_nested_json_is_one_line(server):
    for depth in (5000, 30000):
        nested = b"[" * depth + b"]" * depth
        status, _, body = exchange(server, request(server, "POST", "/api/generate",
                                                   headers={"Content-Type": "application/json"}, body=nested))
        refused(status, body, 400, "nested too deeply")
    body = json.dumps({**SETTINGS, "steps": [[["2"]]]}).encode()  # nested but shallow: still not a setting
    status, _, answer = exchange(server, request(server, "POST", "/api/generate",
                                                 headers={"Content-Type": "application/json"}, body=body))
    refused(status, answer, 400, "'steps'")
    for bad in (b"{", b"\xff\xfe", b"[1, 2]"):
        status, _, answer = exchange(server, request(server, "POST", "/api/generate",
                                                     headers={"Content-Type": "application/json"}, body=bad))
        refused(status, answer, 400, "JSON")


def test_short_and_slow_requests_time_out_instead_of_hanging(server):
    hdrs = {"Content-Type": "application/json"}
    t0 = time.monotonic()  # a body shorter than announced, the client waiting for an answer
    status, _, body = exchange(server, request(server, "POST", "/api/generate", headers=hdrs, length="100") + b"{}")
    refused(status, body, 408, "did not arrive")
    assert READ_SECONDS <= time.monotonic() - t0 < READ_SECONDS + 3
    t0 = time.monotonic()  # a client dribbling its headers: closed at the deadline
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /api/info HTTP/1.1\r\n")
        closed = None
        for _ in range(50):
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = time.monotonic() - t0
                break
            time.sleep(0.1)
        if closed is None:
            s.settimeout(3)
            assert s.recv(100) == b""  # the server hung up
            closed = time.monotonic() - t0
    assert closed < READ_SECONDS + 3
    t0 = time.monotonic()  # a silent client
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        assert s.recv(100) == b""
    assert time.monotonic() - t0 < READ_SECONDS + 3


def test_clients_that_go_away_cost_nothing(server):
    for data in (request(server, "POST", "/api/generate", headers={"Content-Type": "application/json"},
                         length="500") + b'{"sampler"', post(server)):
        exchange(server, data, then_close=True)  # mid-body, and right after asking for a job
    big = {**SETTINGS, "steps": "400", "n": "2000"}  # mid-stream: the job stops at its next step
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(post(server, big))
        assert s.recv(200).startswith(b"HTTP/1.0 200")
    deadline = time.monotonic() + 10
    while server.studio.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.studio.lock.locked(), "the abandoned job kept the model"
    assert server.studio.counter.calls < 400, "the abandoned job ran to its end"
    status, _, body = exchange(server, post(server))
    assert status == 200 and messages(body)[-1]["type"] == "done"


def test_other_methods_and_bad_request_lines_are_one_json_line(server):
    for method in ("PUT", "DELETE", "OPTIONS", "PATCH"):
        status, _, body = exchange(server, request(server, method, "/api/generate", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}))
        refused(status, body, 501)  # no CORS preflight passes
    status, _, body = exchange(server, request(server, "GET", "/", headers={f"X-{i}": i for i in range(200)}))
    refused(status, body, 431)
    status, _, body = exchange(server, b"GARBAGE\r\n\r\n")  # an HTTP/0.9 request: the line alone comes back
    refused(400, body, 400, "Bad request")
    status, _, body = exchange(server, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
    refused(status, body, 414)
    status, _, body = exchange(server, request(server, "POST", "/api/nothing", headers={
        "Content-Type": "application/json"}, body=b"{}"))
    refused(status, body, 404, "/api/nothing")


def test_a_burst_of_generates_is_answered_without_resets(server, monkeypatch):
    """200 clients at once: each gets its samples or a one-line 'busy' (503); none is reset or left hanging."""
    monkeypatch.setattr(studio_app, "WAIT_SECONDS", 5.0)
    answers, failures = [], []

    def client() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("POST", "/api/generate", body=json.dumps({**SETTINGS, "steps": "1", "n": "1"}),
                         headers={"Content-Type": "application/json", "Origin": origin(server)})
            resp = conn.getresponse()
            answers.append((resp.status, messages(resp.read())[-1]))
            conn.close()
        except Exception as e:  # noqa: BLE001  (a reset or a timeout: the test fails below)
            failures.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(200)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(90)
    assert not failures, failures[:3]
    assert len(answers) == 200
    done = [m for s, m in answers if s == 200 and m["type"] == "done"]
    busy = [m for s, m in answers if s == 503]
    assert len(done) + len(busy) == 200 and done, {s for s, _ in answers}
    assert all("busy" in m["message"] for m in busy)


# --- downloads and the command -------------------------------------------------------------------------------
def test_downloads_of_a_run_with_a_non_latin1_name(server):
    status, _, body = exchange(server, post(server))
    rid = messages(body)[-1]["id"]
    status, headers, png = exchange(server, request(server, "GET", f"/results/{rid}.png"))
    assert status == 200 and png.startswith(b"\x89PNG")
    cd = headers["Content-Disposition"]
    assert cd.isascii()
    fallback = re.search(r'filename="([^"]+)"', cd).group(1)
    assert fallback == f"anneau-donnees-_-{rid}.png" or (fallback.isascii() and fallback.endswith(".png"))
    encoded = re.search(r"filename\*=([^;]+)", cd).group(1)
    charset, _, value = email.utils.decode_rfc2231(encoded)
    assert charset.lower() == "utf-8" and unquote(value) == f"{NAME}-{rid}.png"
    assert studio_server.content_disposition("run-r1.png") == 'attachment; filename="run-r1.png"'
    assert "\n" not in studio_server.content_disposition('a"b\r\nX-Injected: 1.png')


def test_sigterm_stops_the_command_and_removes_its_temp_folder(run, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torchdiffusion", "studio", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line
        assert [p.name.startswith("torchdiffusion-studio-") for p in tmp_path.iterdir()] == [True]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out.strip() == "stopped" and err == "", err
    assert list(tmp_path.iterdir()) == []
