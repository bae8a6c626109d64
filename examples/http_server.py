"""A handler for ``agentq worker --http``: a tiny HTTP server, standard library only.

    python examples/http_server.py 8080      # serves until Ctrl-C
    agentq worker writer --http http://127.0.0.1:8080/

The worker POSTs each job's view as JSON (``jobId``, ``task``, ``target``,
``dispatchedBy``, ``attempt``, ``dependencies`` with their results, …). A 2xx
answer completes the job with its body as the result (JSON when it parses);
any other status fails the attempt with the body as the error.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JobHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        job = json.loads(self.rfile.read(length) or b"{}")
        task = str(job.get("task", "")).strip()
        if not task:
            self.answer(422, {"error": "the task is empty"})
            return
        words = task.split()
        self.answer(200, {
            "draft": f"A note on {' '.join(words[:8])}",
            "words": len(words),
            "attempt": job.get("attempt"),
        })

    def answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        print(f"http_server: {format % args}", file=sys.stderr, flush=True)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    server = ThreadingHTTPServer(("127.0.0.1", port), JobHandler)
    print(f"listening on http://127.0.0.1:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
