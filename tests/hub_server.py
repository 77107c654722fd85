"""A Hugging Face Hub stand-in on 127.0.0.1 serving one directory as one repo, so tests can fill a cache with
huggingface_hub's own download code and no network."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def serve_repo(directory: Path, repo_id: str) -> tuple[str, http.server.ThreadingHTTPServer]:
    """(endpoint URL, server) answering the three requests snapshot_download makes: revision info, file
    tree, and HEAD/GET of each file. Call server.shutdown() when done."""
    files = {f.name: f.read_bytes() for f in directory.iterdir() if f.is_file()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, body: bytes, content_type: str, head: bool = False, **headers: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _file(self, head: bool) -> None:
            name = self.path.split("/resolve/", 1)[1].split("?")[0].split("/", 1)[1]
            if name not in files:
                self.send_error(404)
                return
            data = files[name]
            self._send(data, "application/octet-stream", head, X_Repo_Commit=COMMIT,
                       ETag=f'"{hashlib.sha256(data).hexdigest()}"')

        def do_HEAD(self) -> None:
            self._file(head=True)

        def do_GET(self) -> None:
            if "/resolve/" in self.path:
                self._file(head=False)
            elif "/tree/" in self.path:
                tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in files.items()]
                self._send(json.dumps(tree).encode(), "application/json")
            else:  # /api/models/{repo}/revision/{rev} and any other metadata call
                info = {"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
                self._send(json.dumps(info).encode(), "application/json")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
