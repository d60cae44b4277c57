"""node.toml and flags: one option table, file values under flags (no event loop, no sockets)."""

from __future__ import annotations

import argparse

import pytest

from peer.config import (
    NODE_OPTIONS,
    ConfigError,
    add_options,
    parse_ice_port,
    parse_location,
    read_config_file,
    resolve,
)

SAMPLE = {
    str: '"x"',
    int: "7",
    float: "0.5",
    parse_location: '"48.86,2.35"',
    parse_ice_port: "40000",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, NODE_OPTIONS)
    return resolve(parser.parse_args(argv))


def test_every_flag_is_a_config_key(tmp_path):
    """Each option can be set from the file, under its flag name or with underscores."""
    lines = []
    for option in NODE_OPTIONS:
        if option.name == "config":
            continue
        if option.kind == "list":
            value = '["a", "b"]'
        elif option.kind in ("flag", "bool"):
            value = "true"
        else:
            value = SAMPLE[option.type]  # type: ignore[index]
        lines.append(f"{option.name} = {value}")
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    values = read_config_file(path)
    assert set(values) == {o.dest for o in NODE_OPTIONS if o.name != "config"}
    path.write_text("max_consumers = 3\n")
    assert read_config_file(path) == {"max_consumers": 3}


@pytest.mark.parametrize(
    ("file", "argv", "expected"),
    [
        ("", [], {"port": 8080, "host": "127.0.0.1", "bootstrap": [], "uvloop": True}),
        ("port = 9000\n", [], {"port": 9000}),
        ("port = 9000\n", ["--port", "9100"], {"port": 9100}),
        ('bootstrap = ["10.0.0.1:4000"]\n', [], {"bootstrap": ["10.0.0.1:4000"]}),
        ('bootstrap = "10.0.0.1:4000"\n', [], {"bootstrap": ["10.0.0.1:4000"]}),
        ('bootstrap = ["a:1"]\n', ["--bootstrap", "b:2"], {"bootstrap": ["b:2"]}),
        ("uvloop = false\n", [], {"uvloop": False}),
        ("uvloop = false\n", ["--uvloop"], {"uvloop": True}),
        ("log-json = true\ndev = true\n", [], {"log_json": True, "dev": True}),
        ("max-cpu = 1\n", [], {"max_cpu": 1.0}),
        ("", [], {"ice_port": 0}),
        ("ice-port = 40000\n", [], {"ice_port": 40000}),
        ('ice-port = "per-transport"\n', [], {"ice_port": None}),
        ("ice-port = 40000\n", ["--ice-port", "per-transport"], {"ice_port": None}),
    ],
)
def test_flags_override_file(tmp_path, file, argv, expected):
    path = tmp_path / "node.toml"
    path.write_text(file)
    args = parse(["--config", str(path), *argv])
    for key, value in expected.items():
        assert getattr(args, key) == value


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ("prot = 1\n", "unknown option 'prot'"),
        ('port = "x"\n', "bad value 'x' for port"),
        ("port = true\n", "port must be a number"),
        ("host = 1\n", "host must be a string"),
        ('dev = "yes"\n', "dev must be true or false"),
        ("port = \n", "not valid TOML"),
        ("config = 'other.toml'\n", "unknown option 'config'"),
    ],
)
def test_bad_files(tmp_path, file, message):
    path = tmp_path / "node.toml"
    path.write_text(file)
    with pytest.raises(ConfigError, match=message):
        read_config_file(path)


@pytest.mark.parametrize(
    ("text", "ok"),
    [("48.86,2.35", (48.86, 2.35)), ("-33.9,151.2", (-33.9, 151.2)), ("91,0", None), ("x", None)],
)
def test_location_option(text, ok):
    if ok is None:
        with pytest.raises(ValueError):
            parse_location(text)
    else:
        assert parse_location(text) == ok


@pytest.mark.parametrize(
    ("text", "ok"),
    [("40000", 40000), ("0", 0), (40000, 40000), ("per-transport", None), ("65536", "range"),
     ("-1", "range"), ("x", "per-transport")],
)  # fmt: skip
def test_ice_port_option(text, ok):
    if isinstance(ok, str):
        with pytest.raises(ValueError, match=ok):
            parse_ice_port(text)
    else:
        assert parse_ice_port(text) == ok
