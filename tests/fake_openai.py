"""A local OpenAI-compatible HTTP server for tests; subclasses script ``handle``.

Not a test module. Used by the bridge's openai backend tests and the eval judge's.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAIServer:
    """Serves POSTs on 127.0.0.1 (``self.url`` ends in ``/v1``), each to ``handle``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    fake.handle(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up, as some tests intend

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        raise NotImplementedError  # each fake scripts its own answers

    @staticmethod
    def reply(handler: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def reply_stream(handler: BaseHTTPRequestHandler, chunks: list[dict], gap_s: float = 0.0,
                     done: bool = True) -> None:
        """Server-sent events as an OpenAI-compatible server streams them: one ``data:`` line
        per chunk, ``gap_s`` seconds apart, then ``data: [DONE]`` (unless ``done`` is False,
        a stream cut short)."""
        import time

        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        for chunk in chunks:
            handler.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            handler.wfile.flush()
            time.sleep(gap_s)
        if done:
            handler.wfile.write(b"data: [DONE]\n\n")
            handler.wfile.flush()

    @staticmethod
    def stream_chunks(content: str, reasoning: str = "", finish_reason: str = "stop", pieces: int = 4) -> list[dict]:
        """``content`` and ``reasoning`` cut into ``pieces`` deltas each, then the finish reason."""
        def cut(text):
            step = max(1, -(-len(text) // pieces))
            return [text[i:i + step] for i in range(0, len(text), step)]

        chunks = [{"choices": [{"index": 0, "delta": {"reasoning_content": p}, "finish_reason": None}]}
                  for p in cut(reasoning)]
        chunks += [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in cut(content)]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
        return chunks

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
