"""The forwarding core compiled with mypyc: the build, and compiled or source at import.

The modules every forwarded packet goes through (:data:`MODULES`: RTP rewriting, statistics,
the ingress and RTCP state machines, the engine) are plain typed, sans-I/O Python. The set-up
(``scripts/dev setup``, run by every ``scripts/dev`` command) compiles them with mypyc into
extension modules beside their sources: same code, same tests, less interpreter per packet
(BENCHMARKS.md, "The forwarding core compiled"). The node runs the sources instead when:

- nothing was built (no C compiler, or ``pip install`` without the set-up);
- ``CASCADE_COMPILED=0`` is set (benchmarks' same-run baseline, debugging with pdb);
- a source changed since the build (``stale``): editing ``peer/engine.py`` takes effect at
  once, with a warning until the next set-up rebuilds.

Compiled and source modules are never mixed: the compiled modules share one library and
construct each other's classes directly, so either all of :data:`MODULES` load compiled or
none do.

    scripts/dev setup                          # compiles when the sources changed
    .venv/bin/python -c 'import peer.native as n; n.main(["status"])'   # compiled | why not
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

log = logging.getLogger("cascade.native")

MODULES = ("peer.rtp", "peer.stats", "peer.ingress", "peer.rtcp", "peer.engine", "peer.egress")
GROUP = "cascade_core"
SHARED = f"{GROUP}__mypyc"  # the top-level module name of the library the modules share
ROOT = Path(__file__).resolve().parent.parent
STAMP_NAME = ".native-build.json"  # beside the sources: the digests a build is valid for
ENV = "CASCADE_COMPILED"

#: Why the node runs its sources, or "compiled".
COMPILED, DISABLED, STALE, ABSENT = "compiled", "disabled", "stale", "absent"


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def extension_path(module: str, root: Path = ROOT) -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return root.joinpath(*module.split(".")).with_suffix(suffix)


def source_digests(root: Path = ROOT, modules: Sequence[str] = MODULES) -> dict[str, str]:
    """SHA-256 of each compiled module's source: what a build is valid for."""
    return {m: hashlib.sha256(source_path(m, root).read_bytes()).hexdigest() for m in modules}


def build_state(
    stamp: dict[str, object] | None,
    digests: dict[str, str],
    extensions_present: bool,
    python_tag: str,
    env_value: str | None,
) -> str:
    """Whether to load the compiled modules (:data:`COMPILED`) or why not. Pure."""
    if env_value == "0":
        return DISABLED
    if stamp is None or not extensions_present:
        return ABSENT
    if stamp.get("python") != python_tag:
        return ABSENT
    if stamp.get("sources") != digests:
        return STALE
    return COMPILED


def _python_tag() -> str:
    return f"{sys.implementation.cache_tag}-{sysconfig.get_config_var('EXT_SUFFIX')}"


def stamp_path(root: Path = ROOT) -> Path:
    return root / "peer" / STAMP_NAME


def _read_stamp(root: Path = ROOT) -> dict[str, object] | None:
    try:
        data = json.loads(stamp_path(root).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def shared_library_path(root: Path = ROOT) -> Path:
    return root / f"{SHARED}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"


def extensions_present(root: Path = ROOT) -> bool:
    """Whether every compiled module and the library they share are on disk."""
    return shared_library_path(root).exists() and all(
        extension_path(m, root).exists() for m in MODULES
    )


def _load_shared_library() -> None:
    """Import the shared library from the project root by path: the compiled modules import
    it by its top-level name, and the root is on ``sys.path`` only when the node is started
    from there (not for ``.venv/bin/cascade`` run elsewhere)."""
    if SHARED in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(SHARED, shared_library_path())
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {shared_library_path()}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[SHARED] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[SHARED]
        raise


def current_state(root: Path = ROOT) -> str:
    """:func:`build_state` for this checkout and environment."""
    env = os.environ.get(ENV)
    if env == "0":
        return DISABLED
    present = extensions_present(root)
    if not present:
        return ABSENT
    return build_state(_read_stamp(root), source_digests(root), present, _python_tag(), env)


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads :data:`MODULES` from their ``.py`` files even where an extension sits beside."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


_selected: str | None = None


def select() -> str:
    """Decide once per process, before any of :data:`MODULES` is imported (``peer`` does it
    on import): returns the state; anything but :data:`COMPILED` loads the sources."""
    global _selected
    if _selected is not None:
        return _selected
    try:
        state = current_state()
    except OSError:  # a source file unreadable: let the normal import report it
        state = ABSENT
    if state == COMPILED:
        try:
            _load_shared_library()
        except ImportError as exc:
            log.warning("peer: the compiled forwarding core does not load (%s); running "
                        "the sources", exc)  # fmt: skip
            state = ABSENT
    if state != COMPILED:
        sys.meta_path.insert(0, _SourceFinder())
        if state == STALE:
            log.warning(
                "peer: sources changed since the forwarding core was compiled; running the "
                "sources (scripts/dev setup rebuilds)"
            )
    _selected = state
    return state


def build(force: bool = False) -> str:
    """Compile :data:`MODULES` in place with mypyc; returns the new state. Skips when the
    build matches the sources unless ``force``. Raises if the compiler fails."""
    state = build_state(_read_stamp(), source_digests(), extensions_present(), _python_tag(), None)
    if state == COMPILED and not force:
        return state
    # mypyc and setuptools are build tools, imported only here.
    from mypyc.build import mypycify
    from setuptools import Distribution

    here = Path.cwd()
    os.chdir(ROOT)
    try:
        stamp_path().unlink(missing_ok=True)
        paths = [str(source_path(m).relative_to(ROOT)) for m in MODULES]
        extensions = mypycify(paths, opt_level="3", group_name=GROUP)
        build_temp = str(ROOT / "build" / "native")
        dist = Distribution(
            {
                "name": "cascade-core",
                "ext_modules": extensions,
                "script_name": "peer/native.py",
                "script_args": ["-q", "build_ext", "--inplace", "--build-temp", build_temp],
            }
        )
        dist.parse_command_line()
        dist.run_commands()
    finally:
        os.chdir(here)
    stamp_path().write_text(json.dumps({"python": _python_tag(), "sources": source_digests()}))
    return current_state()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else "status"
    if command == "build":
        try:
            state = build(force="--force" in args)
        except Exception as exc:  # no compiler, a type error mypyc rejects...
            print(f"forwarding core not compiled ({exc}); the node runs its sources")
            return 1
        print(f"forwarding core: {state}")
        return 0 if state == COMPILED else 1
    if command == "status":
        print(current_state())
        return 0
    print("usage: main(['build' [, '--force']] | ['status'])", file=sys.stderr)
    return 2
