"""Running the app under uvicorn: in the foreground (`vibecast serve`) or on a background
thread (tests, `vibecast say --model`, `vibecast bench --model`)."""

from __future__ import annotations

import logging
import re
import socket
import threading
from typing import Any

import uvicorn

from ..engine.backend import Backend
from ..engine.loader import load_backend
from .app import create_app
from .config import ServerConfig
from .identity import is_loopback

_TOKEN = re.compile(r"(token=)[^&\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    return _TOKEN.sub(r"\1REDACTED", text)


class RedactTokens(logging.Filter):
    """Browsers can only send the API key as `?token=`, and uvicorn logs request lines with
    their query string: HTTP on "uvicorn.access", WebSocket handshakes on "uvicorn.error"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        # Rewrite the arguments one by one: uvicorn's AccessFormatter unpacks them by position.
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True


REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error")


def install_redaction() -> None:
    # A logger's own filters see only records made on it, not those propagated from children,
    # so the filter goes on each logger uvicorn writes request lines to.
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


def app_state(server: uvicorn.Server) -> Any:
    """The AppState of the vibecast app a uvicorn server runs (sessions, metrics, readiness)."""
    app: Any = server.config.app
    return app.state.vibecast


def uvicorn_config(
    config: ServerConfig, backend: Backend | None = None, **extra: Any
) -> uvicorn.Config:
    def load() -> Backend:
        if backend is not None:
            return backend
        slots = config.max_sessions or None  # VibeVoice: its batch holds what may be admitted
        return load_backend(
            config.model,
            config.device,
            config.dtype,
            config.voices,
            slots,
            config.diffusion_steps,
            config.context_window or None,
        )

    app = create_app(config, load)
    # uvicorn trusts X-Forwarded-For from loopback by default, which lets any local client (or
    # a proxy that passes the header through) pick the address rate limits and logs see.
    proxy: dict[str, Any] = {"proxy_headers": False}
    if config.forwarded_allow_ips is not None:
        proxy = {"proxy_headers": True, "forwarded_allow_ips": config.forwarded_allow_ips}
    uvicorn_settings = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        ws="websockets-sansio",
        # The same event loop and HTTP parser whatever else is installed (Ray's extras bring
        # uvloop and httptools, which uvicorn would otherwise pick): tested behaviour only.
        loop="asyncio",
        http="h11",
        # Frames up to twice the limit reach the app, which answers with a readable `too_big`
        # error; anything larger is cut off by the WebSocket layer with close code 1009.
        ws_max_size=2 * config.limits.max_frame_bytes,
        ws_per_message_deflate=False,  # audio does not compress; deflate only costs CPU
        lifespan="on",
        **{**proxy, **extra},
    )
    install_redaction()  # after uvicorn.Config, which (re)configures uvicorn's loggers
    return uvicorn_settings


def check_exposure(config: ServerConfig) -> None:
    """Without API keys, refuse to listen beyond loopback unless told to (--public)."""
    if not is_loopback(config.host) and not config.api_keys and not config.public:
        raise SystemExit(
            f"refusing to listen on {config.host} without API keys: anyone who can reach it could "
            "use the server. Set --api-key KEY (or VIBECAST_API_KEYS), or pass --public to allow "
            "it anyway."
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts: early clients wait in its backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


class ServerThread:
    """A real uvicorn server on loopback, in a background thread.

    The socket is bound and listening before uvicorn starts, so connections made early wait in
    the backlog; `start` returns once the lifespan has loaded and warmed the engine.
    """

    def __init__(
        self, config: ServerConfig, backend: Backend | None = None, log_level: str = "warning"
    ) -> None:
        self.sock = bind(config.host, config.port)
        self.config = config.replace(port=self.sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn_config(self.config, backend, log_level=log_level))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="uvicorn", daemon=True
        )

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.config.port}/v1/stream"

    @property
    def state(self) -> Any:
        """The app's AppState (sessions, metrics, store), for tests that look inside."""
        return app_state(self.server)

    def start(self, timeout: float = 300.0) -> ServerThread:
        self.thread.start()
        ready = self.state.ready
        deadline = timeout
        while not ready.wait(0.25):  # wake up now and then to notice a failed start
            deadline -= 0.25
            if not self.thread.is_alive() or deadline <= 0:
                self.stop()
                raise RuntimeError("the server did not start (see its log above)")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
