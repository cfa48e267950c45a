"""Pretraining over several machines: two "nodes" on this machine, each its own launcher and torchrun, that
meet at a c10d rendezvous on loopback (gloo), one process each.

A two-node launch starts five interpreters that import torch (~10 s on two cores), hence the slow marks.
"""

import os
import re
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from test_ddp import settings_for
from test_pretrain import cycle, publish_tokens

from model import distributed
from model.checkpoint import load_model
from model.train import METRICS, read_metrics
from model.train_entry import SETTINGS, PretrainSettings, join_command, launch, main, pretrain, rendezvous_id
from storage.errors import ConfigError, TransientError
from storage.store import Store
from tasks.stage import is_transient


@pytest.fixture
def tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Store, str]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two cores for every process of both nodes
    store = Store(tmp_path / "store")
    return store, publish_tokens(store, cycle(3000), cycle(500))


@pytest.fixture
def settings(tokens: tuple[Store, str], tmp_path: Path) -> PretrainSettings:
    return settings_for(*tokens, tmp_path / "run")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_the_weights_of_one_process(
    settings: PretrainSettings, tokens: tuple[Store, str], tmp_path: Path
) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    # The file the lead will write (progress is already off), so that the join command can be known first.
    settings_path = Path(settings.work) / SETTINGS
    Path(settings.work).mkdir(parents=True)
    settings.save(settings_path)
    rendezvous = distributed.Rendezvous(2, endpoint, rendezvous_id(settings_path), timeout_s=60)
    command = shlex.join(join_command(settings_path, rendezvous, 1))

    # The other node's torchrun starts first: with the same host name it would then be numbered first
    # (smaller pid), so the lead's log only has rank 0's lines if the lead's process is renumbered rank 0.
    # torchrun logs at INFO when it starts waiting at the rendezvous.
    other = subprocess.Popen(
        shlex.split(command), stderr=subprocess.PIPE, text=True, env={**os.environ, "LOGLEVEL": "INFO"}
    )
    other_lines: list[str] = []
    waiting = threading.Event()

    def read_other() -> None:
        for line in other.stderr:
            other_lines.append(line.rstrip("\n"))
            if "Rendezvous'ing worker group" in line:
                waiting.set()

    reader = threading.Thread(target=read_other, daemon=True)
    reader.start()
    assert waiting.wait(timeout=120), other_lines
    lines: list[str] = []
    try:
        result, _ = launch(
            settings, 1, nnodes=2, rdzv_endpoint=endpoint, rdzv_timeout=60, log=lines.append, warn=lambda line: None
        )
    finally:
        assert other.wait(timeout=60) == 0, other_lines
        reader.join(timeout=10)

    assert lines[0] == f"this node leads a 2-node launch; run on each other node: {command}"
    assert any("in 2 processes on 2 nodes" in line for line in lines)  # rank 0's log reached the lead
    single, expected = pretrain(settings_for(*tokens, tmp_path / "one"), log=lambda line: None)
    split = load_model(Path(settings.out))
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(split.state_dict()[name], tensor, atol=1e-5, rtol=0, msg=name)
    records = read_metrics(Path(settings.work) / METRICS)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert result.val_loss == pytest.approx(expected.val_loss, abs=1e-5)
    assert result.tokens_seen == expected.tokens_seen  # both nodes' tokens counted


@pytest.mark.slow
def test_a_node_that_never_joins_fails_the_launch_with_one_line_in_bounded_time(settings: PretrainSettings) -> None:
    lines: list[str] = []
    endpoint = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TransientError) as err:
        launch(settings, 1, nnodes=2, rdzv_endpoint=endpoint, rdzv_timeout=2, log=lines.append, warn=lambda line: None)
    assert time.monotonic() - started < 120  # torchrun's own default would wait 600 s
    message = str(err.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"rendezvous at {re.escape(endpoint)} \(id [0-9a-f]{{16}}\) timed out after 2 s: not all 2 nodes joined "
        r"\(each other node runs the join command the lead node logs\)",
        message,
    )
    assert is_transient(err.value)  # a retry waits for the nodes again
    assert "--join" in lines[0] and f"--rdzv-endpoint {endpoint}" in lines[0]


@pytest.mark.parametrize(
    ("nnodes", "endpoint", "reason"),
    [
        (2, None, r"nnodes=2 needs rdzv_endpoint"),
        (2, "node1", r"rdzv_endpoint 'node1': expected HOST:PORT"),
        (2, "node1:0", r"rdzv_endpoint 'node1:0': expected HOST:PORT with a port in 1\.\.65535"),
        (2, ":29500", r"rdzv_endpoint ':29500': expected HOST:PORT"),
        (1, "node1:29500", r"rdzv_endpoint 'node1:29500' is set but nnodes is 1"),
        (0, None, r"nnodes=0: must be at least 1"),
    ],
)
def test_bad_rendezvous_settings_are_refused_before_anything_runs(
    settings: PretrainSettings, nnodes: int, endpoint: str | None, reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason):
        launch(settings, 1, nnodes=nnodes, rdzv_endpoint=endpoint, log=lambda line: None, warn=lambda line: None)
    assert not Path(settings.work).exists()


def test_the_lead_nodes_processes_take_the_first_ranks() -> None:
    # torchrun numbered the lead node 1 of 2, two processes each: the lead's become ranks 0 and 1.
    assert [distributed.lead_first_rank(1, node, local, [2, 2]) for node in (1, 0) for local in (0, 1)] == [0, 1, 2, 3]
    # Three nodes of 1, 2 and 3 processes, the last the lead: then node 0, then node 1, wrapping round.
    ranks = {
        (node, local): distributed.lead_first_rank(2, node, local, [1, 2, 3])
        for node, n in enumerate([1, 2, 3])
        for local in range(n)
    }
    assert ranks == {(2, 0): 0, (2, 1): 1, (2, 2): 2, (0, 0): 3, (1, 0): 4, (1, 1): 5}


def test_a_failure_on_another_node_names_its_rank_and_host(tmp_path: Path) -> None:
    # Every node's processes report into the launch's shared folder; the lead raises the root cause.
    distributed.report_failure(
        RuntimeError("Connection closed by peer gloo/transport/tcp"),
        {distributed.REPORTS_ENV: str(tmp_path), "RANK": "0"},
    )
    distributed.report_failure(KeyError("vocab"), {distributed.REPORTS_ENV: str(tmp_path), "RANK": "1"})
    error = distributed.launch_failure(1, 1, distributed.read_reports(tmp_path), None, nnodes=2)
    assert str(error) == (
        f"training with 1 process on each of 2 nodes failed (exit 1): rank 1 on {socket.gethostname()}: "
        "KeyError: 'vocab'"
    )


@pytest.mark.parametrize("content", [None, "{not json", '{"tokens": "t"}'])
def test_join_without_a_readable_settings_file_fails_with_one_line(
    content: str | None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "run" / SETTINGS
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    code = main(["--join", str(path), "--nnodes", "2", "--rdzv-endpoint", "node1:29500", "--nproc-per-node", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ")
    if content is None:
        assert err == f"error: {path}: no such settings file (the lead writes it as its launch starts)\n"
    else:
        assert "not a pretraining settings file" in err
