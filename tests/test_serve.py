"""The deployments against a real Prefect server: `gptflow serve` registers the on-demand pipeline and the
nightly schedule, a run triggered through the API (as the UI does) executes and lands in the store, and
stopping serve pauses the deployments."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    """Poll `check` until it returns something; a server still starting may answer 5xx meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except urllib.error.HTTPError as error:
            if error.code < 500:
                raise
        except urllib.error.URLError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def api(url: str, path: str, body: dict) -> object:
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "GPTFLOW_CACHE": str(tmp_path / "cache"),
    }
    prefect = Path(sys.executable).with_name("prefect")
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: healthy(url), 120, "the Prefect server")
        yield url, env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_served_deployments_run_when_triggered(prefect_server, tmp_path):
    url, env = prefect_server
    storage = tmp_path / "store"
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--storage", str(storage)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def registered() -> dict | None:
            found = {d["name"]: d for d in api(url, "/deployments/filter", {})}
            return found if {"pipeline", "nightly-retrain"} <= set(found) else None

        deployments = wait_until(registered, 120, "both deployments")
        assert set(deployments) == {"pipeline", "nightly-retrain"}
        (schedule,) = deployments["nightly-retrain"]["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"]
        assert schedule["schedule"]["timezone"] == "UTC"  # stated, so that the UI shows it
        assert deployments["nightly-retrain"]["global_concurrency_limit"]["limit"] == 1

        parameters = {"selection": {"until": "extract"}}
        create = f"/deployments/{deployments['pipeline']['id']}/create_flow_run"
        run = wait_until(lambda: api(url, create, {"parameters": parameters}), 60, "the flow run to be created")

        def finished() -> dict | None:
            with urllib.request.urlopen(f"{url}/flow_runs/{run['id']}", timeout=10) as response:
                state = json.loads(response.read())["state"]
            return state if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

        state = wait_until(finished, 240, "the triggered flow run")
        assert state["type"] == "COMPLETED", state
        record = json.loads((storage / "runs" / f"{run['id']}.json").read_text())
        assert record["status"] == "completed"
        assert set(record["stages"]) == {"download", "extract"}
        assert (storage / "extract" / record["stages"]["extract"]["version"] / "manifest.json").is_file()
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
    # Stopping `gptflow serve` pauses what it served: no nightly run is scheduled while nothing would run it.
    assert not deployments["nightly-retrain"]["paused"]
    served = {d["name"]: d for d in api(url, "/deployments/filter", {})}
    assert served["nightly-retrain"]["paused"] and served["pipeline"]["paused"]
