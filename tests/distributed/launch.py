"""Start N ranks of a script on this machine and collect what each rank reports.

``run_ranks(script, *args)`` runs ``python -m torch.distributed.run --nproc_per_node N --nnodes 1 --master_addr
127.0.0.1 --master_port <free port> script args`` and returns one dict per rank, read from ``<dir>/rank{r}.json``,
the file :func:`tests.distributed.ranks.common.finish` writes (``FXPEFT_RANK_OUT`` names the directory).
``run_launcher(command)`` does the same for any launcher command line (``accelerate launch ...``).

Why a subprocess per test: a process group is per process, and a rank that crashes or deadlocks must not take
pytest with it. So the launcher runs in its own session under a timeout; on timeout the launcher and every process
below it are killed and the test fails with everything the ranks printed; a non-zero exit fails with the full
stdout/stderr too, never with a bare return code. Killing the launcher's process group is not enough: torchrun
starts each worker in a session of its own, so a ``killpg`` leaves the ranks running, holding the output pipe open
(the read then never ends); the tree is found with ``psutil`` before anything is killed.

How rank scripts import ``tests``: a launcher runs the script as a file, so ``sys.path[0]`` is the script's folder,
not the repository root. The launcher's environment gets ``PYTHONPATH=<repo root>`` (prepended to any existing
one), which every rank inherits through torchrun or accelerate; the scripts need no ``sys.path`` edits and can be
run by hand as ``PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/distributed/ranks/ddp.py``.

Loopback only: ``--master_addr 127.0.0.1`` for the store and ``GLOO_SOCKET_IFNAME=lo`` for gloo's own sockets (it
would otherwise pick the interface the hostname resolves to). ``OMP_NUM_THREADS=1``: the ranks share the cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
RANKS = Path(__file__).resolve().parent / "ranks"

# A port chosen free can be taken before the rank-0 store binds it; these words in the output mean that happened,
# and the launch is retried on a fresh port (the only failure retried).
_PORT_TAKEN = ("EADDRINUSE", "Address already in use", "address already in use")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it; it is released before the launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(out_dir: str | Path) -> dict[str, str]:
    """The environment every launch gets: this one plus the repo on ``PYTHONPATH``, one OpenMP thread, loopback
    gloo and ``FXPEFT_RANK_OUT``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["FXPEFT_RANK_OUT"] = str(out_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, every process below it (found before any is killed: orphans are reparented) and its process
    group; wait up to 10 s for them to go."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    psutil.wait_procs(procs, timeout=10)


def run_command(command: list[str], out_dir: Path, timeout: float, env: dict[str, str] | None = None
                ) -> tuple[int, str]:
    """Run ``command`` in a new session, stdout and stderr merged; kill its whole process group on timeout."""
    proc = subprocess.Popen(command, cwd=REPO, env=env or rank_env(out_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # something outside the tree still holds the pipe: report without it
            output = "(output unread: the pipe stayed open after the kill)"
        raise TimeoutError(f"{' '.join(command)} ran past {timeout} s; killed. Output:\n{output}") from None
    return proc.returncode, output


def run_launcher(command: list[str] | Callable[[int], list[str]], world_size: int = 2, timeout: float = 120,
                 env: dict[str, str] | None = None) -> list[dict]:
    """Run a launcher command line and return each rank's JSON result, rank 0 first.

    ``command``: the argv, or a function of a free port returning it (so that a port taken meanwhile can be
    retried on another). Fails with the whole output when the command exits non-zero or a rank wrote no result.
    ``env``: extra variables on top of :func:`rank_env`.
    """
    for attempt in range(3):
        with tempfile.TemporaryDirectory(prefix="fxpeft-ranks-") as tmp:
            out_dir = Path(tmp)
            argv = command(free_port()) if callable(command) else list(command)
            full_env = {**rank_env(out_dir), **(env or {})}
            code, output = run_command(argv, out_dir, timeout, full_env)
            if code != 0 and attempt < 2 and callable(command) and any(w in output for w in _PORT_TAKEN):
                continue
            if code != 0:
                raise AssertionError(f"{' '.join(argv)} exited with {code}. Output:\n{output}")
            results = []
            for rank in range(world_size):
                path = out_dir / f"rank{rank}.json"
                if not path.exists():
                    raise AssertionError(f"rank {rank} wrote no {path.name}. Output:\n{output}")
                results.append(json.loads(path.read_text()))
            extra = sorted(p.name for p in out_dir.glob("rank*.json"))[world_size:]
            if extra:
                raise AssertionError(f"more ranks than {world_size} reported ({extra}). Output:\n{output}")
            return results
    raise AssertionError("unreachable")


def run_ranks(script: str | Path, *args: str, world_size: int = 2, timeout: float = 120) -> list[dict]:
    """``torchrun`` ``world_size`` ranks of ``script`` (a path, or a file name under ``tests/distributed/ranks``)
    on 127.0.0.1 and return each rank's JSON result, rank 0 first."""
    path = Path(script)
    if not path.is_absolute() and not (REPO / path).exists():
        path = RANKS / path
    return run_launcher(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                      str(world_size), "--nnodes", "1", "--master_addr", "127.0.0.1",
                                      "--master_port", str(port), str(path), *args],
                        world_size=world_size, timeout=timeout)
