"""`starsctl cluster up | down | status`: a Ray head on this machine, to run jobs the way a cluster does
(`starsctl submit --address`, `status`, `logs`, `stop`, `list`) without one.

- `start_head`: `ray start --head` in a session of its own, with the dashboard (the Jobs API) on
  127.0.0.1 only, token auth on (`RAY_AUTH_MODE=token`; when no token is found the way Ray looks for one,
  `ray get-auth-token --generate` writes ~/.ray/auth_token), its own temp dir, and every other port
  picked free, so it runs beside other Ray instances of this machine (e.g. the test suite's). The
  session id and the pids it started are recorded in `<temp dir>/stars_cluster.json`.
- `stop_head`: ends the processes of that session and their descendants (Ray workers, and job drivers,
  which Ray starts in sessions of their own), SIGTERM then SIGKILL; nothing else. Never `ray stop`,
  which ends every Ray instance of the user.

Ray's GCS listens on all interfaces (Ray needs the node's address for it; token auth guards it);
only the dashboard is kept on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stars.errors import UserError
from stars.ray_backend.jobs_api import dashboard_lines, token_source

__all__ = [
    "DEFAULT_DASHBOARD_PORT",
    "STATE_FILE",
    "LocalClusterError",
    "LocalHead",
    "cluster_processes",
    "default_temp_dir",
    "head_status",
    "next_steps",
    "read_head",
    "start_head",
    "stop_head",
]

STATE_FILE = "stars_cluster.json"
DEFAULT_DASHBOARD_PORT = 8265
#: Ray puts Unix sockets at `<temp dir>/session_<date>_<time>_<pid>/sockets/...` (about 60 characters
#: more), and a socket path may have at most 107.
MAX_TEMP_DIR = 44
_RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]


class LocalClusterError(UserError):
    """The local head cannot be started or found as asked."""


@dataclass
class LocalHead:
    """A head started by `start_head`, as recorded in its state file."""

    temp_dir: str
    session: int
    """Session id of `ray start` (which leads it): every process Ray started for the head is in it."""
    pids: list[int]
    dashboard_url: str
    gcs_port: int
    num_cpus: int | None
    started: float

    @property
    def state_file(self) -> Path:
        return Path(self.temp_dir) / STATE_FILE


@dataclass(frozen=True)
class _Process:
    pid: int
    ppid: int
    session: int
    zombie: bool
    args: str


def default_temp_dir() -> Path:
    """`<tmp>/stars-ray-<uid>`: one head per user, apart from Ray's default /tmp/ray."""
    return Path(tempfile.gettempdir()) / f"stars-ray-{os.getuid()}"


def _processes() -> list[_Process]:
    """Every process of this machine (`ps`, which Linux and macOS both have). `-ww`: whole command lines
    (`ps` may cut them to a terminal's width, e.g. under pytest, and the temp dir would be cut off)."""
    out = subprocess.run(["ps", "-ww", "-A", "-o", "pid=,ppid=,sess=,stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    procs = []
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) >= 4 and parts[0].isdigit():
            procs.append(_Process(int(parts[0]), int(parts[1]), int(parts[2]), parts[3].startswith("Z"),
                                  parts[4] if len(parts) > 4 else ""))
    return procs


def cluster_processes(head: LocalHead, procs: list[_Process] | None = None) -> list[_Process]:
    """The live processes of `head`: its session and their descendants. Empty when no recorded
    process is left in that session with the head's temp dir on its command line (the session id
    may have been reused by then)."""
    procs = _processes() if procs is None else procs
    live = [p for p in procs if not p.zombie]
    members = {p.pid for p in live if p.session == head.session}
    recorded = [p for p in live if p.pid in head.pids and p.session == head.session and head.temp_dir in p.args]
    if not recorded:
        return []
    children: dict[int, list[int]] = {}
    for p in live:
        children.setdefault(p.ppid, []).append(p.pid)
    todo, found = list(members), set(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return [p for p in live if p.pid in found]


def read_head(temp_dir: str | Path | None = None) -> LocalHead | None:
    """The head recorded in `temp_dir` (default `default_temp_dir()`), or None."""
    state = Path(temp_dir or default_temp_dir()).resolve() / STATE_FILE
    try:
        return LocalHead(**json.loads(state.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise LocalClusterError(f"{state} is not a starsctl cluster state file ({exc}); remove it") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _dashboard_answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the dashboard at `url` answers HTTP at all (401/403 included: it is up, and asks for
    the token)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=timeout_s).close()  # noqa: S310 - our own URL
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _end(head: LocalHead, procs: list[_Process], grace_s: float, kill_wait_s: float = 10.0) -> list[int]:
    """SIGTERM `procs`, SIGKILL what is left of them after `grace_s`, and return (their pids) once they
    are gone or `kill_wait_s` after the SIGKILL. A process the head's session starts meanwhile (the
    raylet starts workers while it stops) counts as one of them; the session counts only when `procs`
    is not empty, i.e. the caller vouched for it."""
    pids = {p.pid for p in procs}
    _kill(sorted(pids), signal.SIGTERM)
    deadline, killed_at = time.monotonic() + grace_s, None
    while True:
        live = [p for p in _processes() if not p.zombie]
        if pids:
            pids |= {p.pid for p in live if p.session == head.session}
        alive = {p.pid for p in live} & pids
        now = time.monotonic()
        if not alive or (killed_at is not None and now > killed_at + kill_wait_s):
            return sorted(pids)
        if now > deadline:
            _kill(sorted(alive), signal.SIGKILL)
            killed_at = killed_at if killed_at is not None else now
        time.sleep(0.5)


def start_head(temp_dir: str | Path | None = None, *, num_cpus: int | None = None,
               dashboard_port: int = DEFAULT_DASHBOARD_PORT, timeout_s: float = 120.0) -> LocalHead:
    """Start a Ray head on this machine (see the module docstring) and record it; the recorded head."""
    temp = Path(temp_dir or default_temp_dir()).resolve()
    if len(str(temp)) > MAX_TEMP_DIR:
        raise LocalClusterError(f"--temp-dir {str(temp)!r} is longer than {MAX_TEMP_DIR} characters: Ray's Unix "
                                "socket paths under it would be too long; use a shorter one, e.g. /tmp/stars-ray")
    running = read_head(temp)
    if running is not None and cluster_processes(running):
        raise LocalClusterError(f"a head started by starsctl is already up at {running.dashboard_url} "
                                f"(temp dir {temp}); `starsctl cluster down` first")
    if not _port_is_free(dashboard_port):
        raise LocalClusterError(f"port {dashboard_port} on 127.0.0.1 is taken (another Ray dashboard?); "
                                "pass --dashboard-port")
    temp.mkdir(parents=True, exist_ok=True)
    (temp / STATE_FILE).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"
    if token_source() is None:  # Ray refuses to start a token-auth head without one
        subprocess.run([*_RAY_CLI, "get-auth-token", "--generate"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    gcs_port = _free_port()
    cmd = [*_RAY_CLI, "start", "--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dashboard_port), "--temp-dir", str(temp), "--disable-usage-stats"]
    for option in ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                   "--runtime-env-agent-port", "--metrics-export-port"):  # fixed defaults would clash
        cmd += [option, str(_free_port())]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    # Its own session: every process `ray start` leaves behind carries the session id recorded below.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    head = LocalHead(str(temp), proc.pid, [], f"http://127.0.0.1:{dashboard_port}", gcs_port, num_cpus, time.time())
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        deadline = time.monotonic() + 30
        while proc.returncode == 0 and not _dashboard_answers(head.dashboard_url):
            if time.monotonic() > deadline:
                raise LocalClusterError(f"the Ray head started but its dashboard {head.dashboard_url} does not answer; "
                                        f"logs: {temp}/session_latest/logs/dashboard.log")
            time.sleep(0.5)
    except BaseException:
        proc.kill()
        _end(head, [p for p in _processes() if p.session == head.session and not p.zombie], grace_s=2)
        raise
    if proc.returncode != 0:
        _end(head, [p for p in _processes() if p.session == head.session and not p.zombie], grace_s=2)
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
        raise LocalClusterError(f"`ray start --head` failed (exit {proc.returncode}): {tail}")
    head.pids = sorted(p.pid for p in _processes() if p.session == head.session and not p.zombie)
    head.state_file.write_text(json.dumps(asdict(head), indent=1))
    return head


def stop_head(temp_dir: str | Path | None = None, grace_s: float = 10.0) -> tuple[LocalHead | None, list[int]]:
    """End the recorded head's processes (see `cluster_processes`) and forget it: (the head or None
    when none was recorded, the pids signalled)."""
    head = read_head(temp_dir)
    if head is None:
        return None, []
    pids = _end(head, cluster_processes(head), grace_s)
    head.state_file.unlink(missing_ok=True)
    return head, pids


def head_status(temp_dir: str | Path | None = None) -> tuple[LocalHead | None, int, bool]:
    """(the recorded head or None, how many of its processes are alive, whether its dashboard answers)."""
    head = read_head(temp_dir)
    if head is None:
        return None, 0, False
    alive = len(cluster_processes(head))
    return head, alive, bool(alive) and _dashboard_answers(head.dashboard_url)


def next_steps(head: LocalHead) -> str:
    """What `starsctl cluster up` prints: the exact commands to use the head."""
    return "\n".join([
        f"Ray head up on this machine: dashboard and Jobs API {head.dashboard_url} (127.0.0.1 only), token auth on",
        f"its processes are recorded in {head.state_file}; `starsctl cluster down` ends exactly those",
        "",
        "next:",
        f"  export RAY_ADDRESS={head.dashboard_url} RAY_AUTH_MODE=token",
        "  starsctl submit jobs/addition.yaml --wait",
        "  starsctl list",
        "",
        *dashboard_lines(head.dashboard_url, token_auth=True),
    ])
