"""Starting the UI: bind, print the address (with the token when one is in force), serve."""

from __future__ import annotations

import sys
from pathlib import Path


def run_ui(root: Path, host: str, port: int, token: str | None) -> None:
    import uvicorn

    from tuneforge.access import access_token, is_loopback
    from tuneforge.infer.serve import bind
    from tuneforge.ui.app import create_app

    token = access_token(host, token, "--token")
    sock = bind(host, port)
    root.mkdir(parents=True, exist_ok=True)
    bound_host, bound_port = sock.getsockname()[:2]
    app = create_app(root, Path.cwd(), token, loopback=is_loopback(host), port=bound_port)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if bound_host in ("0.0.0.0", "::"):
        shown = "localhost"  # a browser on this machine; others use this machine's address
    address = f"http://{shown}:{bound_port}/" + (f"?token={token}" if token else "")
    print(f"tuneforge ui: runs in {root.resolve()}", flush=True)
    print(f"open {address}", flush=True)
    if token and not is_loopback(host):
        print("anyone with this address and token can start runs on this machine", file=sys.stderr)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])
