"""`tidings` command line: run, hub, worker, token, publish, keys, config, status.

Every setting of `Config` is a flag (`--api-port 9000`) with a TIDINGS_* twin
(`TIDINGS_API_PORT=9000`); flags win.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from typing import Any

import orjson

from tidings.config import Config, ConfigError, config_fields, env_name


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also read from its TIDINGS_* variable)")
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["secret"]:
            continue  # secrets come from the environment or a file, never a command line (ps shows it)
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action="store_const", const="1", default=None,
                               help=f"{f.metadata['doc']} [{env_name(f.name)}]")
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.name.split("_")[-1].upper(),
                               help=f"{f.metadata['doc']} [{env_name(f.name)}]")


def _load(args: argparse.Namespace) -> Config:
    overrides = {f.name: getattr(args, f.name, None) for f in config_fields()}
    return Config.load(overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidings", description="real-time event service over WebSockets")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the hub shards and N workers (the one-command default); "
                                     "--role hubs or --role workers for one side of a multi-host setup")
    _add_config_flags(run)
    hub = sub.add_parser("hub", help="run one hub shard process (production: tidings-hub@SHARD.service)")
    hub.add_argument("--shard", type=int, default=0, help="which shard this is, 0 to TIDINGS_HUBS-1 (systemd's %%i)")
    _add_config_flags(hub)
    worker = sub.add_parser("worker", help="run one worker process (production: one per core)")
    worker.add_argument("--index", type=int, default=0, help="this worker's number (systemd's %%i)")
    _add_config_flags(worker)
    config = sub.add_parser("config", help="print the effective configuration, secrets redacted")
    _add_config_flags(config)

    token = sub.add_parser("token", help="print a signed token (HS256 with the configured or dev secret)")
    token.add_argument("--sub", required=True, help="the user id (also the personal channel user:SUB)")
    token.add_argument("--channels", nargs="*", default=[], metavar="PATTERN",
                       help="channels the token may subscribe to: names or prefixes ending in *")
    token.add_argument("--publish", nargs="*", default=[], metavar="PATTERN",
                       help="channels the token may publish to")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until it expires (default 3600)")
    token.add_argument("--private-key", default=None, help="PEM private key for RS256/ES256 tokens")
    _add_config_flags(token)

    publish = sub.add_parser("publish", help="publish one event through the hub")
    publish.add_argument("--channel", action="append", required=True,
                         help="channel to publish to (repeat for a broadcast)")
    publish.add_argument("--type", dest="event_type", required=True, help="event type, e.g. chat_message")
    publish.add_argument("--data", default="{}", help="event data as a JSON object")
    _add_config_flags(publish)

    keys = sub.add_parser("keys", help="CURVE keys for encrypted hub links")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser("generate", help="write this host's key pair (and with --hub the hubs' pair) "
                                                    "into TIDINGS_HUB_KEYS or --dir; existing keys are kept")
    generate.add_argument("--hub", action="store_true", help="also the hubs' key pair (once, on the first hub host)")
    generate.add_argument("--dir", default=None, help="key directory (default: TIDINGS_HUB_KEYS)")
    _add_config_flags(generate)

    status = sub.add_parser("status", help="live numbers of a running instance (from /metrics)")
    _add_config_flags(status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _load(args)
        return int(COMMANDS[args.command](config, args))
    except ConfigError as exc:
        print(f"tidings {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2


# -- commands -----------------------------------------------------------------------------------------
def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from tidings.links import keys_for
    from tidings.logs import setup_logging
    from tidings.supervisor import Supervisor

    dev_keys = not config.api_key or (config.jwt_algorithm == "HS256" and not config.jwt_secret)
    config = config.with_dev_keys()
    config.check_keys(need_api_key=True)
    keys_for(config)  # a key or link problem stops here, not in a restart loop of every child
    log = setup_logging(config.log_format, config.log_level, "supervisor")
    return Supervisor(config, log, dev_keys).run()


def cmd_hub(config: Config, args: argparse.Namespace) -> int:
    from hub.broker import Broker
    from tidings.logs import setup_logging
    from tidings.metrics import Stats, prepare_metrics_dir
    from tidings.scheduling import use_batch_scheduling
    from tidings.sdnotify import Notifier

    # The hub verifies no token, but a production hub without keys means a half-configured
    # instance: refuse it as the workers do, with the same message.
    config.check_keys(need_api_key=False)
    log = setup_logging(config.log_format, config.log_level, f"hub-{args.shard}" if config.hubs > 1 else "hub")
    if config.sched_batch:
        use_batch_scheduling(log)  # before the Broker starts ZeroMQ's I/O thread
    prepare_metrics_dir(config.metrics_path, wipe=False)
    return Broker(config, args.shard, log, Notifier(), Stats()).run()


def cmd_worker(config: Config, args: argparse.Namespace) -> int:
    config.check_keys(need_api_key=True)
    import uvloop

    from tidings.logs import setup_logging
    from tidings.metrics import Stats, prepare_metrics_dir
    from tidings.scheduling import use_batch_scheduling
    from tidings.sdnotify import Notifier

    log = setup_logging(config.log_format, config.log_level, f"worker-{args.index}")
    if config.sched_batch:
        use_batch_scheduling(log)  # before the worker starts ZeroMQ's I/O thread
    prepare_metrics_dir(config.metrics_path, wipe=False)

    async def serve() -> int:
        from workers.server import Worker

        return await Worker(config, args.index, log, Notifier(), Stats()).run()

    try:
        return uvloop.run(serve())
    except OSError as exc:
        log.error("worker %d cannot serve: %s", args.index, exc)
        return 1


def cmd_config(config: Config, args: argparse.Namespace) -> int:
    rows = config.describe()
    width = max(len(r[0]) for r in rows)
    for name, value, doc in rows:
        print(f"{name:<{width}}  {value or '-':<28}  # {doc}")
    print()
    for line in topology(config):
        print(line)
    return 0


def topology(config: Config) -> list[str]:
    """What runs where, in words: `tidings config` prints it, `tidings run` logs it."""
    starts = {"all": f"{config.hubs} hub shard(s) and {config.workers} worker(s)",
              "hubs": f"{config.hubs} hub shard(s), no workers",
              "workers": f"{config.workers} worker(s), no hub (the hubs run elsewhere)"}[config.role]
    if config.hub_keys:
        links = f"CURVE, keys in {config.hub_keys}"
    elif config.uses_tcp:
        links = "tcp:// WITHOUT encryption (TIDINGS_HUB_INSECURE=1)" if config.hub_insecure else \
            "tcp:// without keys: refused at start (set TIDINGS_HUB_KEYS)"
    else:
        links = "local ipc://, no encryption needed"
    lines = [f"topology: `tidings run` starts {starts}; hub links: {links}; "
             f"heartbeat {config.hub_heartbeat:g}s",
             "  channel -> shard: CRC-32(channel UTF-8) % TIDINGS_HUBS"]
    for shard, (ingress, egress, requests) in enumerate(zip(
            config.ingress_endpoints, config.egress_endpoints, config.requests_endpoints, strict=True)):
        lines.append(f"  hub {shard}: ingress {ingress}  egress {egress}  requests {requests}")
    return lines


def cmd_token(config: Config, args: argparse.Namespace) -> int:
    import jwt

    now = int(time.time())
    claims: dict[str, Any] = {"sub": args.sub, "iat": now, "exp": now + int(args.ttl),
                              "channels": args.channels, "publish": args.publish}
    if config.jwt_issuer:
        claims["iss"] = config.jwt_issuer
    if config.jwt_audience:
        claims["aud"] = config.jwt_audience
    if config.jwt_algorithm == "HS256":
        key: Any = config.with_dev_keys().jwt_secret
    elif args.private_key:
        with open(args.private_key, "rb") as fh:
            key = fh.read()
    else:
        raise ConfigError(f"{config.jwt_algorithm} tokens are signed with a private key: pass --private-key")
    print(jwt.encode(claims, key, algorithm=config.jwt_algorithm))
    return 0


def cmd_publish(config: Config, args: argparse.Namespace) -> int:
    from hub.envelope import EnvelopeError
    from hub.publisher import HubUnavailable, Publisher

    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        print(f"tidings publish: --data is not valid JSON: {exc}", file=sys.stderr)
        return 2
    try:
        with Publisher.from_config(config) as pub:
            positions = pub.broadcast_confirmed(args.channel, args.event_type, data)
    except EnvelopeError as exc:
        print(f"tidings publish: {exc}", file=sys.stderr)
        return 2
    except HubUnavailable as exc:
        print(f"tidings publish: {exc} (is `tidings run` or the hub running?)", file=sys.stderr)
        return 1
    print(f"published {args.event_type} to {len(positions)} channel(s)")
    for position in positions:
        print(f"  {position.channel}: offset {position.offset}, epoch {position.epoch}")
    return 0


def cmd_keys(config: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from tidings.links import HOST_NAME, HUB_NAME, generate

    directory = args.dir or config.hub_keys
    if not directory:
        raise ConfigError("where should the keys go? set TIDINGS_HUB_KEYS or pass --dir")
    written = generate(Path(directory), hub=args.hub)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"nothing to do: the keys in {directory} exist (they are never overwritten)")
    d = Path(directory)
    print(f"next: copy {d / (HUB_NAME + '.key')} to every host that runs workers or publishes; copy each such "
          f"host's {HOST_NAME}.key into {d / 'authorized'}/ on every hub host (any name ending in .key), "
          "then `systemctl reload tidings-hubs.target` (SIGHUP to each shard) there")
    return 0


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from tidings.status import format_status

    url = f"http://{config.api_host}:{config.api_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        print(f"tidings status: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    print(format_status(text))
    return 0


COMMANDS = {
    "run": cmd_run, "hub": cmd_hub, "worker": cmd_worker, "config": cmd_config,
    "token": cmd_token, "publish": cmd_publish, "keys": cmd_keys, "status": cmd_status,
}

if __name__ == "__main__":
    sys.exit(main())
