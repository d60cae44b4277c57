"""Every snippet in README.md and docs/deployment.md runs as written.

Fenced ``sh``, ``python`` and ``toml`` blocks run in order, on hosts this test creates as network
namespaces on a bridge (``local`` has only loopback addresses in use; ``eu1`` is 10.0.1.10 and
``us1`` 10.0.2.10), all sharing one working directory. An HTML comment just before a block says
how: ``<!-- run: host=NAME -->`` (default ``local``), ``background`` for a block that starts a
node (ready once it prints ``listening on``; stopped at the end), ``file=NAME`` for a config file
written for later blocks, ``skip (reason)``. Shell blocks share exported variables. ``cascade`` on
the PATH runs this checkout's code. Python blocks in the other docs/ pages are API sketches:
they are compiled and their imports run."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.test_multihost import _skip_reason, lan

ROOT = Path(__file__).resolve().parents[2]
RUN_FILES = ["README.md", "docs/deployment.md"]
HOST_ADDRESSES = {"local": None, "eu1": "10.0.1.10", "us1": "10.0.2.10"}
RUNNABLE = {"sh", "python", "toml"}
FENCE = re.compile(r"(?:<!-- run: (?P<how>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


@dataclass
class Snippet:
    source: str
    lang: str
    body: str
    how: str

    @property
    def host(self) -> str:
        match = re.search(r"host=(\w+)", self.how)
        return match.group(1) if match else "local"

    @property
    def file(self) -> str | None:
        match = re.search(r"file=([\w.\-]+)", self.how)
        return match.group(1) if match else None


def snippets(path: str) -> list[Snippet]:
    text = (ROOT / path).read_text()
    return [
        Snippet(path, m.group("lang"), m.group("body"), m.group("how") or "")
        for m in FENCE.finditer(text)
    ]


def test_every_runnable_snippet_is_run_or_says_why_not():
    for path in RUN_FILES:
        for snippet in snippets(path):
            assert snippet.lang in RUNNABLE | {"text"}, (path, snippet.body[:60])
            if snippet.how.startswith("skip"):
                assert "(" in snippet.how, f"{path}: say why a snippet is skipped"


@pytest.mark.parametrize("page", ["docs/dht.md", "docs/relay-protocol.md", "docs/architecture.md"])
def test_api_sketches_compile_and_import(page):
    for snippet in snippets(page):
        if snippet.lang != "python":
            continue
        tree = compile(snippet.body, page, "exec", flags=ast.PyCF_ONLY_AST | 0x2000)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                exec(compile(ast.Module([node], []), page, "exec"), {})


def _env_script(work: Path) -> str:
    return f"source {work / 'env.sh'}\n"


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_readme_and_deployment_snippets_run_as_written(tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "cascade"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m peer.cli "$@"\n')
    shim.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "HOME": str(work),
    }
    (work / "env.sh").write_text("")
    background: list[tuple[Snippet, subprocess.Popen[str]]] = []
    names = list(HOST_ADDRESSES)
    with lan(len(names)) as namespaces:
        hosts = dict(zip(names, namespaces, strict=True))
        for name, address in HOST_ADDRESSES.items():
            # lan() numbered them 10.77.0.x; give eu1/us1 the addresses the docs use
            if address is not None:
                subprocess.run(
                    ["ip", "netns", "exec", hosts[name], "ip", "addr", "add", f"{address}/16",
                     "dev", "eth0"],
                    check=True,
                )  # fmt: skip
        try:
            for path in RUN_FILES:
                for snippet in snippets(path):
                    if snippet.how.startswith("skip") or snippet.lang not in RUNNABLE:
                        continue
                    if snippet.lang == "toml":
                        assert snippet.file, f"{path}: a toml snippet needs file="
                        (work / snippet.file).write_text(snippet.body)
                        continue
                    ns = ["ip", "netns", "exec", hosts[snippet.host]]
                    if snippet.lang == "python":
                        (work / "snippet.py").write_text(snippet.body)
                        script = _env_script(work) + f'exec "{sys.executable}" snippet.py\n'
                    else:
                        script = _env_script(work) + "set -e\n" + snippet.body
                        if "background" not in snippet.how:
                            script += f"\nexport -p > {work / 'env.sh'}\n"
                    proc = subprocess.Popen(
                        [*ns, "bash", "-c", script],
                        cwd=work,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        start_new_session=True,
                    )
                    if "background" in snippet.how:
                        background.append((snippet, proc))
                        assert proc.stdout is not None
                        seen = []
                        for line in proc.stdout:
                            seen.append(line)
                            if "listening on" in line:
                                break
                        else:
                            err = proc.stderr.read() if proc.stderr else ""
                            raise AssertionError(f"{path}: {snippet.body!r} stopped: {err}")
                        continue
                    out, err = proc.communicate(timeout=150)
                    assert proc.returncode == 0, f"{path}: {snippet.body!r}\n{out}\n{err}"
                    for bad in ("Traceback", "Unclosed", "never retrieved", "was destroyed"):
                        assert bad not in err, f"{path}: {snippet.body!r}\n{err}"
                    if snippet.lang == "python":
                        assert "frames_decoded" in out, out
        finally:
            for _, proc in background:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            for snippet, proc in background:
                proc.wait(30)
                err = proc.stderr.read() if proc.stderr else ""
                assert "Traceback" not in err, f"{snippet.source}: {snippet.body!r}\n{err}"
