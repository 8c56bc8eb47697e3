"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1 for the judge client's tests.

Its answers come from a real local model (``LocalJudge.judge_prompts`` on the user message, i.e. forced-choice
decoding as vLLM's guided choice would do), serialized as the JSON the judge prompt asks for. ``faults`` is a
queue of misbehaviours applied to the next requests, one each:
``("sleep", seconds)`` answers late, ``("status", code)`` answers with that HTTP status (and ``Retry-After: 0``),
``("body", text)`` answers 200 with ``text`` as the raw body, ``("content", text)`` answers with ``text`` as
the assistant message.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(self, local_judge):
        self.local_judge = local_judge
        self.faults: list[tuple[str, object]] = []
        self.requests = 0
        self.answers: dict[str, str] = {}  # the model's answer per prompt, computed once (as a prefix cache would)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _answer(self, payload: dict) -> str:
        prompt = next(m["content"] for m in reversed(payload["messages"]) if m["role"] == "user")
        with self.lock:
            if prompt not in self.answers:
                verdict = self.local_judge.judge_prompts([prompt])[0]
                self.answers[prompt] = json.dumps({"refusal": verdict.refusal, "compliance": verdict.compliance,
                                                   "coherence": verdict.coherence, "reason": verdict.reason})
            return self.answers[prompt]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    kind, value = server.faults.pop(0) if server.faults else (None, None)
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                if kind == "status":
                    return self._send(value, json.dumps({"error": {"message": f"status {value}"}}).encode(),
                                      {"Retry-After": "0"})
                if kind == "body":
                    return self._send(200, value.encode())
                if kind == "sleep":
                    time.sleep(value)
                content = value if kind == "content" else server._answer(payload)
                body = {"id": f"chatcmpl-{server.requests}", "object": "chat.completion", "model": payload["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}]}
                try:
                    self._send(200, json.dumps(body).encode())
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        return Handler
