"""The forwarding core compiled with mypyc (peer/native.py): which code a node runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from peer import native

ROOT = Path(__file__).resolve().parents[2]
DIGESTS = {"peer.rtp": "a" * 64, "peer.engine": "b" * 64}
STAMP = {"python": "tag", "sources": DIGESTS}
EDITED = {"python": "tag", "sources": {**DIGESTS, "peer.rtp": "c" * 64}}


@pytest.mark.parametrize(
    ("stamp", "present", "tag", "env", "state"),
    [
        (STAMP, True, "tag", None, native.COMPILED),
        (STAMP, True, "tag", "1", native.COMPILED),
        (STAMP, True, "tag", "0", native.DISABLED),
        (None, False, "tag", "0", native.DISABLED),
        (None, False, "tag", None, native.ABSENT),
        (STAMP, False, "tag", None, native.ABSENT),  # an extension deleted
        (None, True, "tag", None, native.ABSENT),  # built without the set-up's stamp
        (STAMP, True, "other", None, native.ABSENT),  # built for another interpreter
        (EDITED, True, "tag", None, native.STALE),  # a source edited since
    ],
)
def test_build_state(
    stamp: dict[str, object] | None, present: bool, tag: str, env: str | None, state: str
) -> None:
    assert native.build_state(stamp, DIGESTS, present, tag, env) == state


def _loaded_files(env: dict[str, str], cwd: Path = ROOT) -> dict[str, str]:
    code = (
        "import importlib, json, peer.native as n\n"
        "mods = [importlib.import_module(m) for m in n.MODULES]\n"
        "print(json.dumps({m.__name__: m.__file__ for m in mods}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    files: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return files


def test_disabled_runs_every_module_from_source() -> None:
    files = _loaded_files({"CASCADE_COMPILED": "0"})
    assert sorted(files) == sorted(native.MODULES)
    assert all(f.endswith(".py") for f in files.values()), files


def test_a_build_is_used_whole_or_not_at_all() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_COMPILED"}
    files = _loaded_files({**env, "CASCADE_COMPILED": "1"})
    compiled = [m for m, f in files.items() if not f.endswith(".py")]
    state = native.current_state()
    if state == native.COMPILED:
        assert sorted(compiled) == sorted(native.MODULES)
    else:
        assert compiled == [], (state, files)


def test_the_compiled_core_loads_whatever_the_working_directory(tmp_path: Path) -> None:
    """`.venv/bin/cascade` started elsewhere: the project root is not on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_COMPILED"}
    for package in ("peer", "common"):  # the packages, as the editable install maps them
        (tmp_path / package).symlink_to(ROOT / package)
    env["PYTHONPATH"] = str(tmp_path)
    files = _loaded_files(env, cwd=tmp_path)
    compiled = [m for m, f in files.items() if not f.endswith(".py")]
    if native.current_state() == native.COMPILED:
        assert sorted(compiled) == sorted(native.MODULES), files
    else:
        assert compiled == [], files


def test_the_setup_compiles_the_core_where_there_is_a_compiler() -> None:
    """`scripts/dev setup` builds the core; without a C compiler the node runs the sources."""
    if os.environ.get("CASCADE_COMPILED") == "0":
        pytest.skip("CASCADE_COMPILED=0")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the node runs its sources")
    state = native.current_state()
    if state == native.STALE:
        pytest.skip("a source changed since the last build (scripts/dev setup rebuilds)")
    assert state == native.COMPILED


def test_a_changed_source_makes_the_build_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CASCADE_COMPILED", raising=False)
    for module in native.MODULES:
        target = native.source_path(module, tmp_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(native.source_path(module), target)
        native.extension_path(module, tmp_path).write_bytes(b"")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    (tmp_path / f"{native.GROUP}__mypyc{suffix}").write_bytes(b"")
    stamp = {"python": native._python_tag(), "sources": native.source_digests(tmp_path)}
    native.stamp_path(tmp_path).write_text(json.dumps(stamp))
    assert native.current_state(tmp_path) == native.COMPILED
    engine = native.source_path("peer.engine", tmp_path)
    engine.write_text(engine.read_text() + "\n# edited\n")
    assert native.current_state(tmp_path) == native.STALE
