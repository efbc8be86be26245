"""Serve the built site on localhost with the headers wllama's threads need.

    python serve.py dist [--port 8000]

wllama runs llama.cpp on shared WebAssembly memory, which browsers only allow on a cross-origin
isolated page: every response carries COOP `same-origin` and COEP `require-corp`. Any static host
works the same way once it sends these two headers (and `application/wasm` for .wasm files).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
from pathlib import Path

ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


class IsolatedHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".js": "text/javascript", ".gguf": "application/octet-stream"}

    def end_headers(self) -> None:
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # one line per request on stderr, no host lookup
        sys.stderr.write(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the site built by `node build.mjs` (default dist)", nargs="?",
                    default=Path(__file__).parent / "dist")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = ap.parse_args(argv)
    if not (args.folder / "index.html").is_file():
        print(f"error: {args.folder} has no index.html; build the site first (node build.mjs PACKAGE)", file=sys.stderr)
        return 2
    handler = functools.partial(IsolatedHandler, directory=str(args.folder))
    with http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler) as server:
        print(f"serving {args.folder} at http://127.0.0.1:{server.server_address[1]}/", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
