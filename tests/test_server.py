"""`gptflow server start | stop` against the real thing: a Prefect server, a process work pool and its worker,
driven through the API exactly as the UI drives them (a triggered run, the Retry button, the nightly schedule),
and the UI's own pages rendered by a headless Chromium.

The server tests share one server (its start costs 30-60 s on 2 cores); each gives its runs a store of its own
and a small corpus, so that a run takes seconds. The tests of `stop`'s bookkeeping need no server.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psutil
import pytest
from pydantic import ValidationError

from flows import server
from storage.errors import ConfigError
from tasks.sample_data import default_corpus_documents, write_openwebtext_archive

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# A zone with no daylight saving time, so that the schedule's hour below is simple arithmetic.
ZONE = "Asia/Kolkata"
AUTH = "ops:s3cret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    store: Path
    api_url: str
    ui_url: str
    env: dict[str, str]
    auth: str | None = None

    def call(self, path: str, body: object = None, *, auth: bool = True) -> object:
        """One API call as the UI makes it (JSON; with the basic-auth header when the server has one).

        A 503 is retried, as Prefect's own client does: the server answers so when SQLite is busy with
        another writer (the worker, a run's logs), and the request's transaction was rolled back. A read that
        times out is retried too (only a read: it changes nothing): on 2 busy cores the server has been seen
        to hold a request past 30 s while a run's process wrote to it.
        """
        headers = {"Content-Type": "application/json"}
        if auth and self.auth:
            headers["Authorization"] = "Basic " + base64.b64encode(self.auth.encode()).decode()
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(6):
            request = urllib.request.Request(f"{self.api_url}{path}", data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    raw = response.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as error:
                if error.code != 503 or attempt == 5:
                    raise
            except TimeoutError:
                if data is not None or attempt == 5:
                    raise
            time.sleep(0.5 * 2**attempt)

    def deployment(self, name: str) -> dict:
        return self.call(f"/deployments/name/gptflow-pipeline/{name}")

    def trigger(self, deployment: str, parameters: dict) -> str:
        run = self.call(f"/deployments/{self.deployment(deployment)['id']}/create_flow_run", {"parameters": parameters})
        return run["id"]

    def run(self, run_id: str) -> dict:
        return self.call(f"/flow_runs/{run_id}")

    def wait(self, run_id: str, types: set[str] = TERMINAL, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["state"]["type"] in types:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} still {run['state']['name']} after {timeout:.0f}s")

    def states(self, run_id: str) -> list[str]:
        return [state["name"] for state in self.call(f"/flow_run_states/?flow_run_id={run_id}")]

    def task_runs(self, run_id: str) -> list[dict]:
        return self.call("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})


def launch_server(root: Path, *args: str) -> tuple[subprocess.Popen, Server]:
    """`gptflow server start` in a store under `root`, as a user types it, with test-speed Prefect settings."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "GPTFLOW_CACHE": str(root / "cache"),
        # Pick runs up every 2 s, and retry a run held back by the concurrency limit after 2 s (10 s, 30 s).
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    }
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"):
        env.pop(name, None)
    store = root / "store"
    command = [sys.executable, "-m", "flows.cli", "server", "start", "--storage", str(store), "--port", str(port)]
    process = subprocess.Popen([*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    auth = args[args.index("--auth") + 1] if "--auth" in args else None
    return process, Server(store, f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}", env, auth)


def stop_server(found: Server) -> subprocess.CompletedProcess:
    """`gptflow server stop`, as a user types it (with the API's password in the environment, if it has one)."""
    command = [sys.executable, "-m", "flows.cli", "server", "stop", "--storage", str(found.store)]
    env = {**found.env, "PREFECT_API_AUTH_STRING": found.auth} if found.auth else found.env
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def hour_far_from_now(zone: str) -> int:
    """An hour of the day about 12 h away in `zone`: no nightly run falls due while the tests run, and the
    last one a schedule at that hour would have made lies ~12 h back, beyond the 6 h staleness bound."""
    return (datetime.now(ZoneInfo(zone)).hour + 12) % 24


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Two servers, started at once (a start mostly waits on Prefect's own): a plain one for most tests and
    for the UI's pages (which ask a person for the password of a server with auth), and one with basic auth."""
    quiet = ("--cron", f"0 {hour_far_from_now(ZONE)} * * *", "--timezone", ZONE)
    launched = [
        launch_server(tmp_path_factory.mktemp("server"), *quiet),
        launch_server(tmp_path_factory.mktemp("auth"), *quiet, "--auth", AUTH),
    ]
    try:
        for process, found in launched:
            out, err = process.communicate(timeout=400)
            assert process.returncode == 0, out + err
            assert f"Prefect UI  {found.ui_url}" in out
        yield [found for _, found in launched]
    finally:
        for process, found in launched:
            process.kill()  # a start still waiting; stop then ends what it recorded
            process.wait()
            stop_server(found)


@pytest.fixture(scope="session")
def prefect_server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="session")
def guarded_server(servers) -> Server:
    return servers[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """120 documents in two inner archives: every stage up to clean has real work, done in seconds."""
    path = tmp_path_factory.mktemp("corpus") / "openwebtext.tar.xz"
    return write_openwebtext_archive(default_corpus_documents()[:120], path, docs_per_subset=60, subsets_per_file=2)


def stage_task_runs(task_runs: list[dict], stage: str) -> list[dict]:
    """The stage's own task runs (named after the stage), not its per-shard ones (`<stage>-<step>-<shard>`)."""
    return [t for t in task_runs if t["name"] == stage or t["name"].startswith(f"{stage} ")]


@pytest.mark.slow
def test_a_run_triggered_with_parameters_completes_on_the_worker(prefect_server, corpus, tmp_path):
    storage = tmp_path / "store"
    parameters = {"storage": str(storage), "sources": [str(corpus)], "selection": {"until": "extract"}}
    run_id = prefect_server.trigger("pipeline", parameters)

    run = prefect_server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["work_pool_name"] == "gptflow"
    record = json.loads((storage / "runs" / f"{run_id}.json").read_text())
    assert record["status"] == "completed" and set(record["stages"]) == {"download", "extract"}
    assert (storage / "extract" / record["stages"]["extract"]["version"] / "manifest.json").is_file()


@pytest.fixture(scope="session")
def retried_run(prefect_server, corpus, tmp_path_factory) -> dict:
    """A run whose last stage (clean) fails, then is retried as the UI's Retry button does it.

    The failure is a file where the store keeps the clean stage's folder: it fails at run time, in that
    stage only, is not retried by the task (a local disk error is not transient), does not depend on the
    user (root reads files whatever their mode), and goes away with the file, as a fixed disk would, so
    that the retry, with the very same parameters, can succeed.
    """
    storage = tmp_path_factory.mktemp("retry") / "store"
    storage.mkdir()
    (storage / "clean").write_text("not a folder")
    parameters = {"storage": str(storage), "sources": [str(corpus)], "selection": {"until": "clean"}}
    run_id = prefect_server.trigger("pipeline", parameters)
    failed = prefect_server.wait(run_id)

    (storage / "clean").unlink()
    retry = {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}  # the UI's request
    answer = prefect_server.call(f"/flow_runs/{run_id}/set_state", {"state": retry, "force": False})
    completed = prefect_server.wait(run_id)
    return {"id": run_id, "storage": storage, "failed": failed, "completed": completed, "answer": answer}


@pytest.mark.slow
def test_a_run_failed_in_its_last_stage_and_retried_completes_from_the_cached_stages(prefect_server, retried_run):
    assert retried_run["failed"]["state"]["type"] == "FAILED"
    assert "clean" in retried_run["failed"]["state"]["message"]
    assert retried_run["answer"]["status"] == "ACCEPT"
    completed = retried_run["completed"]
    assert completed["state"]["type"] == "COMPLETED", completed["state"]
    assert completed["run_count"] == 2

    task_runs = prefect_server.task_runs(retried_run["id"])
    attempts = {1: {}, 2: {}}
    for stage in ("download", "extract", "clean"):
        for task_run in stage_task_runs(task_runs, stage):
            attempts[task_run["flow_run_run_count"]][stage] = task_run["state"]["name"]
    assert attempts[1] == {"download": "Completed", "extract": "Completed", "clean": "Failed"}
    # download always re-checks its source (it reuses the stored archive); the stages before the failed one
    # come back Cached, and only the failed one is computed again.
    assert attempts[2] == {"download": "Completed", "extract": "Cached", "clean": "Completed"}
    record = json.loads((retried_run["storage"] / "runs" / f"{retried_run['id']}.json").read_text())
    assert record["status"] == "completed"


@pytest.mark.slow
def test_a_second_nightly_run_waits_for_the_one_running(prefect_server, corpus, tmp_path):
    parameters = {"storage": str(tmp_path / "store"), "sources": [str(corpus)], "selection": {"until": "download"}}
    first = prefect_server.trigger("nightly-retrain", parameters)
    second = prefect_server.trigger("nightly-retrain", parameters)

    runs = [prefect_server.wait(run_id) for run_id in (first, second)]
    assert [run["state"]["type"] for run in runs] == ["COMPLETED", "COMPLETED"]
    held = [run for run in runs if "AwaitingConcurrencySlot" in prefect_server.states(run["id"])]
    assert len(held) == 1, [prefect_server.states(run["id"]) for run in runs]
    earlier, later = sorted(runs, key=lambda run: run["start_time"])
    assert later is held[0]
    assert earlier["end_time"] <= later["start_time"]  # never side by side


@pytest.mark.slow
def test_a_scheduled_nightly_run_that_starts_too_late_skips_its_work(prefect_server):
    nightly = prefect_server.deployment("nightly-retrain")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["timezone"] == ZONE  # what the UI shows beside the schedule
    # What the scheduler would have made had the server been up ~12 h ago: a run of the schedule, due then.
    now = datetime.now(UTC)
    window = {"start_time": (now - timedelta(hours=24)).isoformat(), "end_time": (now - timedelta(hours=7)).isoformat()}
    prefect_server.call(f"/deployments/{nightly['id']}/schedule", {**window, "max_runs": 1})
    (late,) = prefect_server.call(
        "/flow_runs/filter",
        {
            "flow_runs": {"expected_start_time": {"before_": window["end_time"]}},
            "deployments": {"id": {"any_": [nightly["id"]]}},
        },
    )
    assert late["auto_scheduled"]

    run = prefect_server.wait(late["id"], timeout=120)
    assert (run["state"]["type"], run["state"]["name"]) == ("COMPLETED", "Skipped"), run["state"]
    assert "skipped" in run["state"]["message"] and "max_start_delay_hours=6" in run["state"]["message"]
    assert not (prefect_server.store / "runs" / f"{late['id']}.json").exists()  # no stage started


@pytest.mark.slow
def test_the_ui_shows_the_run_its_stages_and_its_summary(prefect_server, retried_run, tmp_path):
    browser = next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )
    assert browser, "these tests need a headless Chromium: apt-get install chromium (.ci/run installs it)"
    run_id = retried_run["id"]
    profile = ["--headless", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
    if os.geteuid() == 0:
        profile.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    page = f"{prefect_server.ui_url}/runs/flow-run/{run_id}"
    shot = tmp_path / "flow-run.png"
    shown = subprocess.run(
        [browser, *profile, f"--screenshot={shot}", "--window-size=1280,900", "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
    )

    from PIL import Image

    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1280, 900)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)  # None: more colours than that
        assert colors is None or len(colors) > 50, "a blank page"
    # The page's logs name the stage task runs (a page that cannot reach the API shows none of them).
    for stage in ("download", "extract", "clean"):
        names = {t["name"] for t in stage_task_runs(prefect_server.task_runs(run_id), stage)}
        assert names and any(name in shown.stdout for name in names), stage
    # The artifacts tab: the legacy UI hides it until the run has loaded and so ignores ?tab=Artifacts on a
    # fresh page; the new UI opens it from the address.
    artifacts = subprocess.run(
        [browser, *profile, "--dump-dom", f"{prefect_server.ui_url}/v2/runs/flow-run/{run_id}?tab=Artifacts"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "gptflow-summary" in artifacts.stdout


@pytest.mark.slow
def test_with_auth_anonymous_calls_are_refused_and_the_worker_still_runs_flows(guarded_server, corpus, tmp_path):
    with pytest.raises(urllib.error.HTTPError) as refused:
        guarded_server.call("/flows/filter", {}, auth=False)
    assert refused.value.code == 401
    with urllib.request.urlopen(f"{guarded_server.api_url}/health", timeout=10) as response:
        assert response.status == 200  # a load balancer's check needs no password

    parameters = {"storage": str(tmp_path / "store"), "sources": [str(corpus)], "selection": {"until": "download"}}
    run = guarded_server.wait(guarded_server.trigger("pipeline", parameters))
    assert run["state"]["type"] == "COMPLETED", run["state"]


@pytest.mark.slow
def test_registering_again_keeps_a_deployment_paused_in_the_ui_paused(prefect_server):
    from flows.deploy import NightlySchedule

    nightly = NightlySchedule(cron=f"0 {hour_far_from_now(ZONE)} * * *", timezone=ZONE)
    settings = server.ServerSettings()
    deployment_id = prefect_server.deployment("nightly-retrain")["id"]
    prefect_server.call(f"/deployments/{deployment_id}/pause_deployment", {})
    try:
        # What `gptflow server start` does on a store whose server ran before.
        assert server.register(prefect_server.store, prefect_server.api_url, settings, nightly) == ["nightly-retrain"]
        assert prefect_server.deployment("nightly-retrain")["paused"] is True
        assert prefect_server.deployment("pipeline")["paused"] is False
    finally:
        prefect_server.call(f"/deployments/{deployment_id}/resume_deployment", {})
    assert server.register(prefect_server.store, prefect_server.api_url, settings, nightly) == []
    assert prefect_server.deployment("nightly-retrain")["paused"] is False


@pytest.mark.slow
def test_stop_cancels_the_runs_in_flight_and_leaves_none_of_the_processes_alive(guarded_server, corpus, tmp_path):
    parameters = {"storage": str(tmp_path / "store"), "sources": [str(corpus)]}  # the whole pipeline: minutes
    run_id = guarded_server.trigger("pipeline", parameters)
    guarded_server.wait(run_id, {"RUNNING"} | TERMINAL)
    recorded = json.loads((guarded_server.store / ".server" / "state.json").read_text())["processes"]
    processes = [psutil.Process(p["pid"]) for p in recorded]
    processes += [child for p in list(processes) for child in p.children(recursive=True)]
    assert any("prefect.engine" in " ".join(p.cmdline()) for p in processes)  # the run's own process

    stopped = stop_server(guarded_server)
    assert stopped.returncode == 0, stopped.stderr
    lines = stopped.stdout.splitlines()
    assert lines[1:] == [f"worker (pid {recorded[1]['pid']}) stopped", f"server (pid {recorded[0]['pid']}) stopped"]
    # The run ended Cancelled (a Retry in the UI), not left showing Running once its process was gone.
    assert lines[0].endswith(f"({run_id}) cancelled"), lines
    alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]
    assert "no gptflow server recorded" in stop_server(guarded_server).stdout


# -- stop's bookkeeping, without a server -------------------------------------------------------------------


def record(storage: Path, processes: list[dict]) -> None:
    server.state_dir(storage).mkdir(parents=True, exist_ok=True)
    server.write_state(storage, {"ui_url": "http://127.0.0.1:1", "processes": processes})


def launch(storage: Path, name: str, script: str) -> dict:
    server.state_dir(storage).mkdir(parents=True, exist_ok=True)
    return server._launch(name, ["sh", "-c", script], dict(os.environ), server.state_dir(storage))


def test_stop_ends_a_recorded_process_and_the_children_it_moved_to_sessions_of_their_own(tmp_path):
    process = launch(tmp_path, "worker", "setsid sleep 60 & exec sleep 60")
    leader = psutil.Process(process["pid"])
    deadline = time.monotonic() + 10
    while not leader.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = leader.children()
    while os.getsid(child.pid) == os.getsid(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.getsid(child.pid) != os.getsid(leader.pid)
    record(tmp_path, [process])

    assert server.stop(tmp_path, server.ServerSettings(stop_grace_s=5)) == [f"worker (pid {process['pid']}) stopped"]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in (leader, child))
    assert not (server.state_dir(tmp_path) / "state.json").exists()


def test_stop_says_so_when_a_recorded_process_is_already_gone(tmp_path):
    process = launch(tmp_path, "server", "exec sleep 60")
    gone = psutil.Process(process["pid"])
    gone.kill()
    gone.wait(timeout=10)
    record(tmp_path, [process])

    assert server.stop(tmp_path) == [f"server (pid {process['pid']}) was already gone"]


def test_stop_leaves_alone_a_process_that_was_given_a_recorded_pid(tmp_path):
    process = launch(tmp_path, "server", "exec sleep 60")
    try:
        record(tmp_path, [{**process, "started": process["started"] - 3600}])  # the recorded one started earlier

        assert server.stop(tmp_path) == [f"server (pid {process['pid']}) was already gone"]
        assert psutil.Process(process["pid"]).status() != psutil.STATUS_ZOMBIE
    finally:
        os.kill(process["pid"], signal.SIGKILL)


def test_stop_without_a_recorded_server_says_so(tmp_path):
    assert server.stop(tmp_path) == [f"no gptflow server recorded in {tmp_path.resolve() / '.server'}"]


def test_start_refuses_a_port_in_use_before_starting_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use"):
            server.start(tmp_path, server.ServerSettings(port=port))
    assert server.read_state(tmp_path) is None


def test_start_refuses_while_the_recorded_server_runs(tmp_path):
    process = launch(tmp_path, "server", "exec sleep 60")
    try:
        record(tmp_path, [process])
        with pytest.raises(ConfigError, match="already running .*: stop it first with `gptflow server stop --storage "):
            server.start(tmp_path, server.ServerSettings(port=free_port()))
    finally:
        os.kill(process["pid"], signal.SIGKILL)


def test_auth_must_name_a_user_and_a_password():
    with pytest.raises(ValidationError, match="user:password"):
        server.ServerSettings(auth="s3cret")
    assert server.ServerSettings(auth="ops:s3:cret").auth == "ops:s3:cret"
