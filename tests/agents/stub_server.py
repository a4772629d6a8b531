"""A local OpenAI-compatible chat-completions server that plays a script: tool calls, bad JSON, errors, slow replies.

Each POST to /v1/chat/completions takes the next action of the script (the last one repeats):
  {"tool_calls": [(name, arguments_text), ...], "content": str}  a normal reply
  {"content": str}                                                a reply without tool calls
  {"status": 500}                                                 an HTTP error
  {"sleep": seconds, ...}                                         the reply after a delay (a slow endpoint)
  {"raw": bytes}                                                  a body that is not a chat completion
The requests received are kept (`requests`) so a test can check what the agent sent.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StubServer:
  """`with StubServer(script) as s:` serves at `s.base_url` until the block ends."""

  def __init__(self, script: list[dict[str, Any]]):
    self.script, self.requests, self._i = list(script), [], 0
    stub = self

    class Handler(BaseHTTPRequestHandler):
      def log_message(self, *args: Any) -> None:
        pass

      def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])).decode())
        stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        action = stub.script[min(stub._i, len(stub.script) - 1)]
        stub._i += 1
        if action.get("sleep"):
          time.sleep(float(action["sleep"]))
        if "status" in action:
          self.send_response(int(action["status"]))
          self.end_headers()
          self.wfile.write(b'{"error": "scripted"}')
          return
        if "raw" in action:
          payload = action["raw"]
        else:
          calls = [{"id": f"c{stub._i}_{j}", "type": "function", "function": {"name": n, "arguments": a}}
                   for j, (n, a) in enumerate(action.get("tool_calls", []))]
          message = {"role": "assistant", "content": action.get("content", "")}
          if calls:
            message["tool_calls"] = calls
          payload = json.dumps({"choices": [{"index": 0, "message": message}], "usage": {"completion_tokens": 5}}
                               ).encode()
        try:
          self.send_response(200)
          self.send_header("Content-Type", "application/json")
          self.end_headers()
          self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
          pass

    self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  def __enter__(self) -> StubServer:
    self._thread.start()
    return self

  def __exit__(self, *exc: Any) -> None:
    self._server.shutdown()
    self._server.server_close()
