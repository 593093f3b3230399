"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for endpoint tests.

Tests script it with `server.respond = fn(body, call_index) -> Reply`; it records every
request (body and headers) and the most requests it ever had in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from pipeline.labels import EMOTIONS


@dataclass
class Reply:
    content: str = ""  # the assistant's message
    status: int = 200  # anything else is sent as an error with no JSON body
    raw: bytes | None = None  # sent as the whole body instead of a chat-completion object
    delay_s: float = 0.0  # sleep before answering (timeouts)
    # requests arrive in waves of this size: each is answered once its whole wave has
    # arrived (or after 5 s), so a concurrency test sees full waves however slowly the
    # client's threads start on a loaded machine (no timing in the assertion)
    wave: int = 0


def subtitle_of(body: dict[str, Any]) -> str:
    """The user message of a request (the quoted subtitle and anything after it)."""
    return body["messages"][-1]["content"]


def default_reply(body: dict[str, Any], call: int) -> Reply:
    """JSON scores (happy wins) when asked for JSON, else an echo of the user message."""
    if body.get("response_format", {}).get("type") == "json_object":
        return Reply(json.dumps({e: (3 if e == "happy" else 1) for e in EMOTIONS}))
    return Reply("enriched: " + subtitle_of(body).splitlines()[2])


class FakeLLMServer:
    def __init__(self) -> None:
        self.respond: Callable[[dict[str, Any], int], Reply] = default_reply
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True  # a slow answer must not hold up stop()
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> "FakeLLMServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            call = len(self.requests)
            self.requests.append(body)
            self.headers.append(dict(handler.headers))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.changed.notify_all()
        counted = True
        try:
            reply = self.respond(body, call)
            if reply.wave:
                wave_end = (call // reply.wave + 1) * reply.wave
                with self.changed:
                    self.changed.wait_for(lambda: len(self.requests) >= wave_end, timeout=5.0)
            time.sleep(reply.delay_s)
            payload = reply.raw if reply.raw is not None else json.dumps({
                "id": f"chatcmpl-{call}", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply.content}}]}).encode()
            if reply.status != 200:
                payload = b'{"error": "scripted failure"}'
            # counted out before the answer leaves: the client may send its next request the
            # moment it reads this one, before this thread would run a `finally`
            with self.lock:
                self.in_flight -= 1
                counted = False
            handler.send_response(reply.status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)
        finally:
            if counted:
                with self.lock:
                    self.in_flight -= 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                server._handle(self)

            def log_message(self, *args: Any) -> None:
                pass  # keep test output clean

        return Handler
