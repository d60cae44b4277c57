"""``cascade node`` settings: one table of options feeds both argparse and the config file.

Adding a node option is one :class:`Option` entry in :data:`NODE_OPTIONS`; it is then a
``--flag`` and a key of ``node.toml`` (same spelling, dashes or underscores). Values come
from the defaults, then the config file, then flags given on the command line.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

OptionKind = Literal["value", "list", "flag", "bool"]


class ConfigError(ValueError):
    """A config file or option value cannot be used (one-line message)."""


def parse_location(text: str) -> tuple[float, float]:
    """``"48.86,2.35"`` -> (latitude, longitude), checked."""
    try:
        lat_text, lon_text = str(text).split(",")
        lat, lon = float(lat_text), float(lon_text)
    except ValueError:
        raise ValueError(f"location must be LAT,LON in degrees, not {text!r}") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"location {text!r} is off the globe")
    return (lat, lon)


def parse_ice_port(text: str | int) -> int | None:
    """``"40000"`` -> 40000; ``"per-transport"`` -> None (a socket per ICE transport)."""
    if str(text) == "per-transport":
        return None
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"ICE port must be 0-65535 or 'per-transport', not {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"ICE port {port} is out of range 0-65535")
    return port


@dataclass(frozen=True)
class Option:
    """One node option: ``--name`` on the command line, ``name`` in the config file."""

    name: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    kind: OptionKind = "value"
    metavar: str | None = None

    @property
    def dest(self) -> str:
        """The attribute name on the parsed namespace."""
        return self.name.replace("-", "_")


NODE_OPTIONS: tuple[Option, ...] = (
    Option("config", "TOML file with any of these options (flags override it)", metavar="FILE"),
    # HTTP / WebSocket signaling
    Option("host", "HTTP/WebSocket bind address", default="127.0.0.1"),
    Option("port", "HTTP/WebSocket port", type=int, default=8080),
    Option(
        "public-url",
        "signaling URL clients and other nodes use (default: http://ANNOUNCE-IP:PORT)",
        metavar="URL",
    ),
    Option("dev", "dev mode: a printed dev secret and dev tokens for the demo page", kind="flag"),
    # ICE
    Option(
        "ice-ip",
        "address ICE binds to (repeatable; default: --host, 127.0.0.1 if that is 0.0.0.0)",
        kind="list",
        metavar="IP",
    ),
    Option(
        "ice-port",
        "the one UDP port of every participant's media (0: any free port; workers use PORT, "
        "PORT+1, ...), or 'per-transport' for a port per participant connection",
        type=parse_ice_port,
        default=0,
        metavar="PORT",
    ),
    Option(
        "announce-ip",
        "this host's address as others reach it: ICE candidates, and the default of "
        "--public-url, --relay-announce and --dht-announce",
        metavar="IP",
    ),
    # access tokens
    Option("secret-file", "file with the HS256 token secret (else $CASCADE_API_SECRET)"),
    Option("token-key", "file with the Ed25519 public key of the token issuer (cascade pubkey)"),
    # admission
    Option("max-consumers", "refuse consumers beyond this many", type=int, default=2000),
    Option("max-cpu", "refuse consumers above this CPU share of a core", type=float, default=0.85),
    Option("max-egress-pps", "refuse consumers above this egress rate", type=float, default=60e3),
    Option(
        "ws-per-ip",
        "WebSocket connections one address may hold (0: no limit, e.g. behind a reverse proxy)",
        type=int,
        default=64,
    ),
    Option(
        "join-rate",
        "joins per second per address, burst 200 (0: no limit)",
        type=float,
        default=20.0,
    ),
    # identity and fleet
    Option("key", "node identity key file (cascade keygen); default: a fresh key"),
    Option("fleet-cert", "fleet certificate of --key (cascade keygen --certify writes KEY.cert)"),
    Option("fleet-operator", "file with the fleet operator's public key (cascade pubkey)"),
    # overlay: DHT
    Option("region", "join the overlay in this region (needs --dht-port)"),
    Option("dht-host", "DHT UDP bind address (default: --host)"),
    Option("dht-port", "DHT UDP port (enables the overlay)", type=int),
    Option("dht-announce", "DHT address other nodes bootstrap through", metavar="HOST[:PORT]"),
    Option(
        "bootstrap",
        "HOST:PORT of a DHT node to join through (repeatable, comma-separated)",
        kind="list",
    ),
    Option("dht-ttl", "directory record lifetime, seconds", type=float, default=10.0),
    # overlay: placement and scaling
    Option(
        "location",
        "this node's LAT,LON in degrees: placement's distance between regions",
        type=parse_location,
        metavar="LAT,LON",
    ),
    Option(
        "scale-webhook",
        "URL to POST the region's signed scale-out / scale-in notifications to",
        metavar="URL",
    ),
    # overlay: relay
    Option("relay-host", "QUIC relay bind address (default: --host)"),
    Option("relay-port", "QUIC relay UDP port (default: any free port with the DHT)", type=int),
    Option("relay-announce", "relay address published to other nodes", metavar="HOST[:PORT]"),
    # drain (SIGTERM or cascade drain)
    Option(
        "admin-token-file",
        "file with the admin token for POST /admin/drain (else $CASCADE_ADMIN_TOKEN); the "
        "node key (cascade drain --key) is always accepted",
    ),
    Option(
        "drain-rate",
        "participants per second a draining node moves to other nodes",
        type=float,
        default=8.0,
    ),
    Option(
        "drain-timeout",
        "seconds a draining node waits for its participants to move before it exits",
        type=float,
        default=30.0,
    ),
    # process
    Option(
        "workers",
        "media worker processes (default: the usable cores; 1: one process)",
        type=int,
        default=0,
    ),
    Option(
        "worker-watermark",
        "CPU share of a core under which a worker keeps taking participants",
        type=float,
        default=0.6,
    ),
    Option("uvloop", "use uvloop", kind="bool", default=True),
    Option("log-level", "DEBUG, INFO, WARNING or ERROR", default="INFO"),
    Option("log-json", "log one JSON object per line", kind="flag"),
)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add ``options`` to ``parser``; unset flags stay absent so the config file can apply."""
    for option in options:
        flag = f"--{option.name}"
        common: dict[str, Any] = {"dest": option.dest, "default": argparse.SUPPRESS}
        if option.kind == "flag":
            parser.add_argument(flag, action="store_true", help=option.help, **common)
        elif option.kind == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, help=option.help, **common
            )
        elif option.kind == "list":
            parser.add_argument(
                flag, action="append", type=option.type, metavar=option.metavar, help=option.help,
                **common,
            )  # fmt: skip
        else:
            parser.add_argument(
                flag, type=option.type, metavar=option.metavar, help=option.help, **common
            )


def _convert(option: Option, value: Any, where: str) -> Any:
    def one(item: Any) -> Any:
        if option.type is str:
            if not isinstance(item, str):
                raise ConfigError(f"{where}: {option.name} must be a string")
            return item
        if isinstance(item, bool) or not isinstance(item, int | float | str):
            raise ConfigError(f"{where}: {option.name} must be a number")
        try:
            convert: Callable[[Any], Any] = option.type
            return convert(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: bad value {item!r} for {option.name}") from None

    if option.kind in ("flag", "bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {option.name} must be true or false")
        return value
    if option.kind == "list":
        items = value if isinstance(value, list) else [value]
        return [one(item) for item in items]
    return one(value)


def read_config_file(path: str | Path, options: Sequence[Option] = NODE_OPTIONS) -> dict[str, Any]:
    """Parse a TOML config file into ``{dest: value}``; unknown keys and bad types raise
    :class:`ConfigError`."""
    by_key = {o.name: o for o in options if o.name != "config"}
    by_key.update({o.dest: o for o in options if o.name != "config"})
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        option = by_key.get(key)
        if option is None:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        values[option.dest] = _convert(option, value, f"config file {path}")
    return values


def resolve(
    given: argparse.Namespace, options: Sequence[Option] = NODE_OPTIONS
) -> argparse.Namespace:
    """Defaults, then ``--config`` file values, then flags given on the command line."""
    values = {o.dest: ([] if o.kind == "list" else o.default) for o in options}
    config = getattr(given, "config", None)
    if config:
        values.update(read_config_file(config, options))
    values.update(vars(given))
    return argparse.Namespace(**values)
