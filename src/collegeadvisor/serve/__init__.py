"""`collegeadvisor serve`: an OpenAI-compatible HTTP server and web chat page for a trained run."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from collegeadvisor.config import ServeConfig, add_command, as_line
from collegeadvisor.errors import AdvisorError
from collegeadvisor.runs import open_run
from collegeadvisor.serve.guard import Limits, allow_cors, uvicorn_config


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear line when the port is taken (uvicorn then serves on it)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise AdvisorError(f"--host {host}: cannot resolve this address ({exc.strerror})") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AdvisorError(f"port {port} on {host} is already in use; stop what runs there or pass --port") from exc
        raise AdvisorError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


@contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread (port 0: a free one), with the same protocol, limits and
    timeouts as `collegeadvisor serve` (the Limits create_app was given, app.state.limits); yields the base URL."""
    import uvicorn  # not loaded until a server starts

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AdvisorError(f"the server on {host}:{sock.getsockname()[1]} did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args) -> int:
    # uvicorn, and serve.app (fastapi, and torch through advise): not loaded until a server starts
    import uvicorn

    from collegeadvisor.serve.app import create_app

    s = ServeConfig.from_args(args)
    sock = bind(s.host, s.port)  # before the slow model load: a taken port fails at once
    api_key = args.api_key or os.environ.get(s.api_key_env) or None
    try:
        # no output folder: the settings go to the log
        run, retriever, model, tok, manifest = open_run(s, log=lambda s: print(as_line(s), file=sys.stderr))
        app = create_app(model, tok, manifest, retriever=retriever, api_key=api_key,
                         default_max_tokens=s.max_new_tokens, max_tokens_limit=s.max_tokens_limit,
                         batch_size=s.batch_size, limits=Limits.from_config(s))
        allow_cors(app, s.cors_origins)  # closed unless origins are named
        if not api_key and not _is_loopback(s.host):
            print(f"warning: serving on {s.host} without an API key (set --api-key or {s.api_key_env})",
                  file=sys.stderr)
        where = f"[{s.host}]" if ":" in s.host else s.host
        print(f"serving run {run} at http://{where}:{s.port}/ (OpenAI API under /v1)", file=sys.stderr)
        uvicorn.Server(uvicorn_config(app, log_level=s.log_level)).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def register(sub) -> None:
    """Add the `serve` subcommand to the CLI's subparsers."""
    p = add_command(sub, "serve", "OpenAI-compatible API and web chat page for a trained run", ServeConfig, cmd_serve)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: the key in the "
                                                   "environment variable api_key_env names); never logged")
