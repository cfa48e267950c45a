"""`gptflow server start | stop`: a local Prefect server whose worker runs the deployments.

`start` launches a Prefect server on 127.0.0.1 (its database: SQLite in `<storage>/.server/prefect.db`,
unless `PREFECT_API_DATABASE_CONNECTION_URL` names another, e.g. a team's PostgreSQL), creates a process work
pool, registers to it the two deployments `gptflow serve` declares, and launches one worker of that pool.
Each process runs in a session of its own; their ids and start times are kept in
`<storage>/.server/state.json`, their logs beside it.

`stop` first has the server cancel the runs the worker is executing, then ends exactly the recorded processes
and their descendants: a process id the system has since given to another program is left alone, because
its start time differs from the recorded one.

With basic auth (`--auth user:pass` or `PREFECT_SERVER_API_AUTH_STRING`) the server refuses API calls that
lack it, and the worker (with the runs it starts) is given it as `PREFECT_API_AUTH_STRING`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.deploy import NightlySchedule
from storage.errors import ConfigError, GptflowError
from storage.store import Store

HOST = "127.0.0.1"  # a local server; a team's shared server is set up by its operators (README)
STATE_DIR = ".server"
STATE_FILE = "state.json"


class ServerSettings(BaseModel):
    """How `gptflow server start` sets up the server and its worker."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(4200, ge=1, le=65535, description="Port of the API and UI on 127.0.0.1 (4200: Prefect's own).")
    auth: str | None = Field(
        None,
        description="Basic auth as user:pass: the server refuses API calls without it, the worker is given it. "
        "Default: $PREFECT_SERVER_API_AUTH_STRING.",
    )
    pool: str = Field("gptflow", description="Name of the process work pool (the one deployments/prefect.yaml uses).")
    startup_timeout_s: float = Field(
        180.0,
        gt=0,
        description="How long the server, then the worker, may take to come up (measured on 2 cores: 10-17 s "
        "idle, up to 76 s with other work on them; a first start also creates the database).",
    )
    cancel_timeout_s: float = Field(
        60.0,
        ge=0,
        description="How long stop waits for the runs it cancelled to end (measured 9-18 s on 2 busy cores: the "
        "worker first loads the flow to run its on_cancellation hooks).",
    )
    stop_grace_s: float = Field(
        15.0, ge=0, description="How long stop waits after SIGTERM before SIGKILL (a worker exited in under 1 s)."
    )

    @field_validator("auth")
    @classmethod
    def _user_and_password(cls, value: str | None) -> str | None:
        if value is not None and (":" not in value or not value.split(":", 1)[0]):
            raise ValueError("expected user:password")
        return value


class ServerError(GptflowError):
    """The server or its worker did not come up; the message names the log to read."""


def state_dir(storage: str | Path) -> Path:
    return Store(storage).root / STATE_DIR


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def start(
    storage: str | Path,
    settings: ServerSettings | None = None,
    nightly: NightlySchedule | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Start the server, the pool, the deployments and the worker for the store at `storage`; returns the
    state recorded in state.json. Whatever started is stopped again if a later step fails."""
    settings = settings or ServerSettings()
    if settings.auth is None and os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        settings = settings.model_copy(update={"auth": os.environ["PREFECT_SERVER_API_AUTH_STRING"]})
    folder = state_dir(storage)
    folder.mkdir(parents=True, exist_ok=True)
    previous = read_state(storage)
    if previous and any(_alive(p) for p in previous["processes"]):
        root = Store(storage).root
        raise ConfigError(
            f"a gptflow server is already running for {root} (UI {previous['ui_url']}): "
            f"stop it first with `gptflow server stop --storage {root}`"
        )
    _require_free_port(settings.port)

    url = api_url(settings.port)
    server_env = _server_env(folder, settings)
    state: dict[str, Any] = {
        "api_url": url,
        "ui_url": url.removesuffix("/api"),
        "pool": settings.pool,
        "auth": settings.auth is not None,
        "database": _redacted(server_env["PREFECT_API_DATABASE_CONNECTION_URL"]),
        "processes": [],
    }
    prefect = [sys.executable, "-m", "prefect"]
    try:
        report(f"starting the Prefect server (log: {folder / 'server.log'})")
        server_command = [*prefect, "server", "start", "--host", HOST, "--port", str(settings.port)]
        server = _launch("server", server_command, server_env, folder)
        state["processes"].append(server)
        write_state(storage, state)
        _wait_until_healthy(url, server, folder / "server.log", settings.startup_timeout_s)

        kept_paused = register(storage, url, settings, nightly)
        report(f"registered the deployments pipeline and nightly-retrain to the work pool {settings.pool}")
        for name in kept_paused:
            report(f"{name} stays paused, as it was left: resume it in the UI (or prefect deployment resume)")
        worker_command = [*prefect, "worker", "start", "--pool", settings.pool, "--type", "process"]
        worker = _launch("worker", worker_command, _client_env(url, settings), folder)
        state["processes"].append(worker)
        write_state(storage, state)
        _wait_for_worker(url, settings, worker, folder / "worker.log")
    except BaseException:
        for line in stop(storage, settings):
            report(line)
        raise
    return state


def register(storage: str | Path, url: str, settings: ServerSettings, nightly: NightlySchedule | None) -> list[str]:
    """Create the process work pool (if missing) and register both deployments to it. A deployment that
    someone paused (in the UI, say) stays paused: registering again must not restart a schedule that was
    stopped on purpose. Returns the names of those kept paused."""
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import temporary_settings

    from flows.deploy import build_deployments

    with temporary_settings(_client_settings(url, settings)):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.workers.process import ProcessWorker

        with get_client(sync_client=True) as client:
            try:
                pool = client.read_work_pool(settings.pool)
            except ObjectNotFound:
                template = ProcessWorker.get_default_base_job_template()
                pool = client.create_work_pool(
                    WorkPoolCreate(name=settings.pool, type="process", base_job_template=template)
                )
            if pool.type != "process":
                raise ConfigError(
                    f"work pool {settings.pool!r} on {url} is of type {pool.type!r}, not process: the deployments "
                    f"need a process pool (prefect work-pool delete {settings.pool})"
                )
            deployments = build_deployments(str(storage), nightly, work_pool=settings.pool)
            kept_paused = []
            for deployment in deployments:
                try:
                    existing = client.read_deployment_by_name(f"{deployment.flow_name}/{deployment.name}")
                except ObjectNotFound:
                    continue
                if existing.paused:
                    deployment.paused = True
                    kept_paused.append(deployment.name)
        for deployment in deployments:
            deployment.apply()
    return kept_paused


def stop(storage: str | Path, settings: ServerSettings | None = None) -> list[str]:
    """End the recorded processes (SIGTERM to each and its descendants, SIGKILL after a grace period), the
    runs the worker is executing cancelled first; one line each on what became of them. The state file goes;
    the logs stay."""
    settings = settings or ServerSettings()
    state = read_state(storage)
    if state is None:
        return [f"no gptflow server recorded in {state_dir(storage)}"]
    lines = []
    by_name = {process["name"]: process for process in state["processes"]}
    if "worker" in by_name and "server" in by_name and _leader(by_name["server"]) is not None:
        lines += _cancel_runs_in_flight(state, by_name["worker"], settings.cancel_timeout_s)
    for name in ("worker", "server"):  # the worker first: it must not see its server vanish mid-run
        if name in by_name:
            lines.append(_stop_process(by_name[name], settings.stop_grace_s))
    (state_dir(storage) / STATE_FILE).unlink(missing_ok=True)
    return lines


def _cancel_runs_in_flight(state: dict[str, Any], worker: dict[str, Any], timeout_s: float) -> list[str]:
    """Cancel, through the server, the runs the worker's processes execute, and wait for them to end so.

    A stopped worker ends its runs' processes without a word to the server, which then shows them Running
    forever, with no Retry button; cancelled, they end Cancelled and can be retried once the server is back.
    Only runs whose process is one of the worker's own are touched. A server with auth needs
    PREFECT_API_AUTH_STRING (or PREFECT_SERVER_API_AUTH_STRING) in stop's environment.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import temporary_settings
    from prefect.states import Cancelling

    pids = {str(p.pid) for p in _tree(worker)}
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    started = FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])
    in_flight = FlowRunFilter(state=FlowRunFilterState(type=started))
    try:
        with temporary_settings(_client_settings(state["api_url"], ServerSettings(auth=auth))):
            with get_client(sync_client=True) as client:
                pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[state["pool"]]))
                runs = [
                    run
                    for run in client.read_flow_runs(flow_run_filter=in_flight, work_pool_filter=pool)
                    if run.infrastructure_pid in pids
                ]
                for run in runs:
                    message = "cancelled by `gptflow server stop`: retry it once the server is back"
                    client.set_flow_run_state(run.id, Cancelling(message=message), force=True)
                deadline = time.monotonic() + timeout_s
                ended: dict[Any, str] = {}
                while len(ended) < len(runs) and time.monotonic() < deadline:
                    for run in runs:
                        found = client.read_flow_run(run.id).state
                        if found is not None and found.is_final():
                            ended[run.id] = found.name
                    time.sleep(0.5)
    except httpx.HTTPError as exc:
        return [f"runs in flight were not cancelled ({exc}); they will show Running in the UI"]
    return [
        f"run {run.name} ({run.id}) {ended[run.id].lower() if run.id in ended else 'did not end in time'}"
        for run in runs
    ]


# -- state --------------------------------------------------------------------------------------------


def read_state(storage: str | Path) -> dict[str, Any] | None:
    path = state_dir(storage) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a gptflow server state file ({exc}); stop its processes by hand") from exc
    return state


def write_state(storage: str | Path, state: dict[str, Any]) -> None:
    path = state_dir(storage) / STATE_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    temporary.replace(path)  # atomic: stop never reads half a file


# -- processes ----------------------------------------------------------------------------------------


def _launch(name: str, command: list[str], env: dict[str, str], folder: Path) -> dict[str, Any]:
    log = folder / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session and process group: stop ends its children with it
        )
    try:
        started = psutil.Process(process.pid).create_time()
    except psutil.NoSuchProcess:
        started = 0.0  # already gone: recorded so, never matched
    return {"name": name, "pid": process.pid, "started": started, "log": str(log), "command": command}


def _leader(process: dict[str, Any]) -> psutil.Process | None:
    """The recorded process itself, if it still runs: same pid and same start time (pids are reused)."""
    try:
        found = psutil.Process(process["pid"])
        if abs(found.create_time() - process["started"]) > 0.05 or found.status() == psutil.STATUS_ZOMBIE:
            return None
        return found
    except psutil.Error:
        return None


def _tree(process: dict[str, Any]) -> list[psutil.Process]:
    """The recorded process, its descendants (the worker starts each flow run in a session of its own) and
    whatever is left of its process group (children whose parent died). The group's id is the recorded pid,
    which the system does not give to a new process while any member lives, so members are its own; but if
    the pid now leads another program's group, nothing is."""
    leader = _leader(process)
    found = {}
    if leader is not None:
        found[leader.pid] = leader
        try:
            found.update({child.pid: child for child in leader.children(recursive=True)})
        except psutil.Error:
            pass
    elif _pid_reused(process):
        return []
    for candidate in psutil.process_iter():
        try:
            if os.getpgid(candidate.pid) == process["pid"]:
                found.setdefault(candidate.pid, candidate)
        except OSError:
            continue
    return [p for p in found.values() if _running(p)]


def _pid_reused(process: dict[str, Any]) -> bool:
    try:
        return abs(psutil.Process(process["pid"]).create_time() - process["started"]) > 0.05
    except psutil.Error:
        return False


def _running(process: psutil.Process) -> bool:
    try:  # psutil's is_running also checks the start time, so a reused pid is not taken for the process
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _alive(process: dict[str, Any]) -> bool:
    return bool(_tree(process))


def _stop_process(process: dict[str, Any], grace_s: float) -> str:
    label = f"{process['name']} (pid {process['pid']})"
    members = _tree(process)
    if not members:
        return f"{label} was already gone"
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for member in members:
            try:
                member.send_signal(sig)
            except psutil.Error:
                continue
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_running(m) for m in members):
            time.sleep(0.2)
        members = [m for m in members if _running(m)]
        if not members:
            return f"{label} stopped" if sig == signal.SIGTERM else f"{label} killed after {grace_s:g} s"
    pids = ", ".join(str(m.pid) for m in members)
    return f"{label}: processes {pids} still run after SIGKILL"


# -- waiting ------------------------------------------------------------------------------------------


def _require_free_port(port: int) -> None:
    with socket.socket() as sock:
        # As the server binds: connections of a server stopped a moment ago (TIME_WAIT) do not hold the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            raise ConfigError(f"port {port} on {HOST} is in use: pass another with --port") from None


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _wait_until_healthy(url: str, server: dict[str, Any], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _leader(server) is None:
            raise ServerError(f"the Prefect server exited during start: {_last_line(log)} (log: {log})")
        try:  # /health answers without auth
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    raise ServerError(f"the Prefect server was not healthy after {timeout_s:g} s (log: {log})")


def _wait_for_worker(url: str, settings: ServerSettings, worker: dict[str, Any], log: Path) -> None:
    """Until the worker has sent its first heartbeat: from then on, runs are picked up. (A worker of an earlier
    start may still count as online for a while: only a heartbeat since this one's launch counts.)"""

    from prefect.settings import temporary_settings

    deadline = time.monotonic() + settings.startup_timeout_s
    with temporary_settings(_client_settings(url, settings)):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                if _leader(worker) is None:
                    raise ServerError(f"the worker exited during start: {_last_line(log)} (log: {log})")
                launched = datetime.fromtimestamp(worker["started"], UTC)
                workers = client.read_workers_for_work_pool(settings.pool)
                if any(w.last_heartbeat_time and w.last_heartbeat_time >= launched for w in workers):
                    return
                time.sleep(0.5)
    raise ServerError(f"the worker did not come online after {settings.startup_timeout_s:g} s (log: {log})")


# -- environments ---------------------------------------------------------------------------------------


def _server_env(folder: Path, settings: ServerSettings) -> dict[str, str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{folder / 'prefect.db'}")
    env.pop("PREFECT_API_URL", None)  # the server is the API; a client setting would point it elsewhere
    # The UI's pages call the API at the address these settings make (`--port` alone leaves them at 4200).
    env.update(PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(settings.port))
    if settings.auth is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = settings.auth
    else:
        env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    return env


def _client_settings(url: str, settings: ServerSettings) -> dict[Any, Any]:
    """This process's Prefect client settings for the new server."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    updates: dict[Any, Any] = {PREFECT_API_URL: url}
    if settings.auth is not None:
        updates[PREFECT_API_AUTH_STRING] = settings.auth
    return updates


def _client_env(url: str, settings: ServerSettings) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)  # a server setting: the flow runs need none of it
    if settings.auth is not None:
        env["PREFECT_API_AUTH_STRING"] = settings.auth
    return env


def _redacted(database_url: str) -> str:
    """A database URL without its password, for the state file and the console."""
    head, at, tail = database_url.rpartition("@")
    if not at or ":" not in head.split("//", 1)[-1]:
        return database_url
    scheme, _, credentials = head.partition("//")
    return f"{scheme}//{credentials.split(':', 1)[0]}:***@{tail}"
