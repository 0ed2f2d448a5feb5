"""The bench's HTTP client against a real local HTTP/1.1 server: keep-alive, headers, errors."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from llava_sessions.bench.served import SESSION_HEADER, Client, ServerError
from tests.fakes import local_http_server


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the reply says otherwise

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.seen.append((self.path, self.headers.get(SESSION_HEADER), body, self.client_address[1]))
        if body.get("stream"):
            self._stream(fail=body.get("prompt") == "fail")
            return
        status, reply = (404, {"error": {"code": "SESSION_NOT_FOUND"}}) if body.get("missing") else (200, {
            "session_id": "s-1", "generated_text": "hi",
            "usage": {"prompt_tokens": 7, "completion_tokens": 1, "cached_tokens": 5},
        })
        payload = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        # Hangs up after the reply without saying so, as a server does when a keep-alive
        # connection has idled past its timeout.
        self.close_connection = server.hang_up_after_reply
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self, fail: bool) -> None:
        """TGI events, chunked: the first at once, the rest after STREAM_PAUSE_S."""
        events = [{"token": {"id": 5, "text": "Hel", "special": False}, "generated_text": None},
                  {"error": "device lost", "error_type": "INTERNAL_ERROR"} if fail else
                  {"token": {"id": 6, "text": "lo", "special": False}, "generated_text": "Hello",
                   "usage": {"prompt_tokens": 9, "completion_tokens": 2, "cached_tokens": 4}}]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for k, event in enumerate(events):
            if k:
                time.sleep(STREAM_PAUSE_S)
            data = ("data:" + json.dumps(event) + "\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args):
        pass


STREAM_PAUSE_S = 0.3


@pytest.fixture
def server():
    def prepare(httpd):
        httpd.seen, httpd.lock, httpd.hang_up_after_reply = [], threading.Lock(), False

    with local_http_server(_Recorder, prepare) as httpd:
        yield httpd


def _client(server, path: str = "") -> Client:
    return Client(f"http://127.0.0.1:{server.server_address[1]}{path}", timeout=5)


def test_turns_reuse_one_connection_and_carry_the_session_header(server):
    client = _client(server)
    for _ in range(5):
        sample = client.turn("s-1", "What is it?", 3)
    assert (sample.text, sample.prompt_tokens, sample.cached_tokens) == ("hi", 7, 5)
    paths, sessions, bodies, ports = zip(*server.seen)
    assert set(paths) == {"/invocations"} and set(sessions) == {"s-1"}
    assert bodies[0] == {"prompt": "What is it?", "max_new_tokens": 3, "temperature": 0, "top_p": 1}
    assert len(set(ports)) == 1  # keep-alive: one TCP connection for all five


def test_each_thread_has_its_own_connection(server):
    client = _client(server)
    threads = [threading.Thread(target=client.turn, args=("s-1", "q", 2)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len({port for *_, port in server.seen}) == 3


def test_a_connection_the_server_closed_is_replaced_before_sending(server):
    client = _client(server)
    server.hang_up_after_reply = True
    opened = []
    for _ in range(3):
        opened.append(client.open("aW1n")[1])
        time.sleep(0.05)  # the server's FIN has arrived: sending on that socket would fail
    assert opened == ["s-1"] * 3
    assert len({port for *_, port in server.seen}) == 3


def test_a_path_prefix_is_kept_and_an_error_status_raises_with_the_body(server):
    client = _client(server, "/prefix/")
    with pytest.raises(ServerError, match="HTTP 404: .*SESSION_NOT_FOUND"):
        client._post({"missing": True}, "s-9")
    assert server.seen[-1][0] == "/prefix/invocations"


def test_send_reports_the_status_without_raising(server):
    seconds, status, payload = _client(server).send({"missing": True}, "s-9")
    assert status == 404 and seconds > 0 and json.loads(payload)["error"]["code"] == "SESSION_NOT_FOUND"


def test_only_plain_http_urls_are_taken():
    with pytest.raises(ValueError, match="plain HTTP"):
        Client("https://example.com")


def test_a_streamed_turn_times_its_first_event_and_reads_the_answer(server):
    client = _client(server)
    sample = client.turn_streamed("s-1", "hi", 4)
    assert sample.first_event_seconds is not None and sample.first_event_seconds < STREAM_PAUSE_S
    assert sample.seconds >= STREAM_PAUSE_S
    assert (sample.text, sample.token_ids, sample.completion_tokens, sample.cached_tokens) == ("Hello", [5, 6], 2, 4)
    assert server.seen[-1][2]["stream"] is True and server.seen[-1][1] == "s-1"
    assert client.turn("s-1", "again", 1).text == "hi"  # the connection is still good after a stream


def test_a_stream_that_ends_in_an_error_event_raises(server):
    with pytest.raises(ServerError, match="device lost"):
        _client(server).turn_streamed("s-1", "fail", 4)
