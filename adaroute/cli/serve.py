"""`adaroute serve MODEL`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching.

Everything that can be checked without the model (options, port, audit file) is checked first, so a
typo fails in a second, not after the model loads. SIGTERM stops accepting, lets in-flight requests
finish (up to --drain seconds, then cancels them), flushes the audit log and exits 0.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
from pathlib import Path

from adaroute.cli import rollout as rollout_cli
from adaroute.cli.common import add_model_arg, positive_int, setup_threads
from adaroute.config import ServeConfig
from adaroute.errors import AdarouteError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a dense or routed model over an OpenAI-compatible HTTP API")
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--arm", choices=("dense", "routed"), help="arm of requests that name none "
                   "(default: routed for a routed model; dense runs the same weights with routing off)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together per arm")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests beyond which 429 is answered")
    p.add_argument("--context", type=positive_int, default=2048, help="most prompt + completion tokens per request "
                   "(capped at the model's positions)")
    p.add_argument("--audit", metavar="PATH.sqlite", help="audit log: one row per request (SQLite, WAL)")
    p.add_argument("--audit-prompts", action="store_true", help="store prompt text in the audit log (default: hash)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require Authorization: Bearer KEY on /v1 (repeatable)")
    p.add_argument("--admin-key", metavar="KEY", help="the key for /dashboard (Authorization: Bearer KEY or "
                   "/dashboard?key=KEY) and the rollout admin API; without it the dashboard is open and there is "
                   "no admin API")
    p.add_argument("--threads", type=positive_int, help="compute threads (default: ADAROUTE_THREADS or every core)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--drain", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, time in-flight requests get to finish before they are cancelled")
    rollout_cli.add_serve_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    config = _config(args)
    rollout_cli.check_serve_options(args)
    _check_port(config.host, config.port)
    if config.audit:
        _check_audit(Path(config.audit))
    setup_threads()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if args.admin_key is not None and not args.admin_key.strip():
        raise AdarouteError("--admin-key: give a non-empty key")
    served = _load(args.model, config)
    return _serve(served, config, args.admin_key, args)


def _config(args) -> ServeConfig:
    try:
        return ServeConfig(host=args.host, port=args.port, arm=args.arm, max_batch=args.max_batch,
                           max_queue=args.max_queue, context=args.context, audit=args.audit,
                           audit_prompts=args.audit_prompts, api_keys=tuple(args.api_key), threads=args.threads,
                           max_body_bytes=args.max_body_bytes, drain_s=args.drain)
    except ValueError as e:  # "field: message" -> "--field: message"
        field, _, message = str(e).partition(":")
        raise AdarouteError(f"--{field.replace('_', '-')}:{message}") from None


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise AdarouteError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise AdarouteError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


def _check_audit(path: Path) -> None:
    if path.is_dir():
        raise AdarouteError(f"--audit {path} is a directory: give a file such as {path / 'audit.sqlite'}")
    if not path.parent.is_dir():
        raise AdarouteError(f"--audit {path}: directory {path.parent} does not exist")
    try:
        from adaroute.serve.audit import connect  # noqa: PLC0415

        connect(path).close()
    except sqlite3.Error as e:
        raise AdarouteError(f"--audit {path}: not a writable SQLite file ({e}); choose another path") from None


def _load(spec: str, config: ServeConfig):
    from adaroute.models import is_routed, load_model, resolve  # noqa: PLC0415 (slow imports after the checks)
    from adaroute.serve.model import ServedModel  # noqa: PLC0415

    source = resolve(spec)
    name = Path(source.gguf_file).stem if source.gguf_file and spec.endswith(".gguf") else Path(spec).name
    if is_routed(source):  # from its files: the weights once, at the format it stores
        return ServedModel.from_directory(source.directory, name, config.context, aliases=(spec,))
    model, tokenizer = load_model(spec)
    return ServedModel(model, tokenizer, name, config.context, None, aliases=(spec,))


def _serve(served, config: ServeConfig, admin_key: str | None = None, args=None) -> int:
    import uvicorn  # noqa: PLC0415

    from adaroute.serve import dashboard  # noqa: PLC0415
    from adaroute.serve.app import create_app  # noqa: PLC0415
    from adaroute.serve.service import Service  # noqa: PLC0415

    try:
        service = Service(served, config)
    except ValueError as e:
        raise AdarouteError(f"--arm: {e}") from None
    rollout_routers = rollout_cli.attach(args, service) if args is not None else ()
    app = create_app(service, extra_routers=(dashboard.router(admin_key), *rollout_routers))
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=config.drain_s))
    # uvicorn re-raises the signal it stopped on once it is done; with this handler a SIGTERM ends in exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"adaroute serve: {served.name} (arms {', '.join(served.arms)}; default {service.default_arm}, "
          f"context {served.context}) on http://{config.host}:{config.port}/v1", flush=True)
    server.run()
    print("adaroute serve: stopped", flush=True)
    return 0
