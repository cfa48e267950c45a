"""Data-parallel pretraining: real torchrun launches of 2 CPU processes (gloo) on a tiny model.

Each launch costs ~5 s on two cores (three interpreters importing torch), hence the slow marks.
"""

import dataclasses
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_pretrain import cycle, publish_tokens, tiny_config

from model import distributed
from model.checkpoint import load_model
from model.gpt import GPTConfig
from model.train import CHECKPOINT, METRICS, TIMING_FIELDS, local_micro_steps, read_metrics
from model.train_entry import RESULT, PretrainSettings, launch, pretrain
from storage.errors import DataIntegrityError, TransientError
from storage.store import Store
from tasks.pretrain import STAGE, PretrainConfig
from tasks.stage import is_transient

KILLED_AT_STEP = 7  # rank 1 dies fetching this step's batch: past the checkpoint at step 5


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two processes on two cores: one thread each (launched children read OMP_NUM_THREADS), and this
    process's reference run alike (a tiny model trains ~4x faster on one thread than on two contending)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokens_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str]:
    store = Store(tmp_path_factory.mktemp("ddp") / "store")
    return store, publish_tokens(store, cycle(3000), cycle(500))


def settings_for(store: Store, tokens: str, folder: Path, **overrides) -> PretrainSettings:
    """A tiny run with dropout (masks must match between the split and the single process) and accumulation."""
    values = dict(grad_accum_steps=2, max_steps=10, log_interval=1, eval_interval=5, checkpoint_interval=5)
    cfg = tiny_config(dropout=0.1, n_layer=1, **{**values, **overrides})
    model = GPTConfig(
        64, cfg.block_size, n_layer=1, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias
    )
    return PretrainSettings(
        tokens=str(store.path("tokens", tokens)),
        model=model.to_dict(),
        train=dataclasses.asdict(cfg.train_config()),
        work=str(folder),
        out=str(folder / "final"),
    )


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.fixture(scope="module")
def two_processes(tokens_store: tuple[Store, str], tmp_path_factory: pytest.TempPathFactory) -> PretrainSettings:
    """One uninterrupted 2-process run, shared by the tests that compare against it."""
    settings = settings_for(*tokens_store, tmp_path_factory.mktemp("two"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        launch(settings, 2, log=lambda line: None, warn=lambda line: None)
    return settings


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one(
    two_processes: PretrainSettings, tokens_store: tuple[Store, str], tmp_path: Path
) -> None:
    single, result = pretrain(settings_for(*tokens_store, tmp_path), log=lambda line: None)

    split = load_model(Path(two_processes.out))
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(split.state_dict()[name], tensor, atol=1e-5, rtol=0, msg=name)
    records = read_metrics(Path(two_processes.work) / METRICS)
    assert [r["step"] for r in records] == list(range(1, 11))
    for got, expected in zip(records, result.records, strict=True):
        assert got["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-5)
        assert got.get("val_loss") == pytest.approx(expected.get("val_loss"), abs=1e-5)
    assert records[-1]["val_loss"] < 3.0  # learning, not just agreeing: ln(40) = 3.7


@pytest.mark.slow
def test_pretrain_stage_with_two_processes_publishes_the_same_version(
    tokens_store: tuple[Store, str], caplog: pytest.LogCaptureFixture
) -> None:
    store, tokens = tokens_store
    cfg = tiny_config(nproc=2, grad_accum_steps=2, max_steps=10, log_interval=2, eval_interval=5)
    with caplog.at_level(logging.INFO, logger="gptflow.pretrain"):
        ref = STAGE.run(store.root, cfg, {"tokens": tokens})

    assert ref.version == STAGE.version(cfg.model_copy(update={"nproc": 1}), {"tokens": tokens})
    folder = store.path("pretrain", ref.version)
    for name in ("model.pt", "model_config.json", "metrics.jsonl", "loss.png", "manifest.json"):
        assert (folder / name).is_file(), name
    assert [r["step"] for r in read_metrics(folder / METRICS)] == [2, 4, 5, 6, 8, 10]  # each once
    metrics = store.manifest("pretrain", ref.version)["metrics"]
    assert metrics["processes"] == 2 and metrics["tokens_seen"] == 10 * 2 * 4 * 16  # both halves counted
    assert metrics["params"] == load_model(folder).num_params()
    assert any("step 10/10 | loss" in message for message in caplog.messages)  # rank 0's log, forwarded
    assert any("in 2 processes" in message for message in caplog.messages)


def test_grad_accum_not_divisible_by_the_processes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"grad_accum_steps \(3\) must be divisible by nproc \(2\)"):
        tiny_config(nproc=2, grad_accum_steps=3)
    assert PretrainConfig.model_fields["nproc"].description
    assert "nproc" in PretrainConfig.RUNTIME_FIELDS
    with pytest.raises(ValueError, match=r"divisible by the number of processes \(4\)"):
        local_micro_steps(6, 0, 4)
    assert list(local_micro_steps(6, 1, 3)) == [1, 4]


@pytest.mark.slow
def test_uneven_split_inside_a_launch_fails_with_one_line_naming_it(
    tokens_store: tuple[Store, str], tmp_path: Path
) -> None:
    # Past the stage's own check (a caller of train_entry directly): every process refuses, before training.
    settings = settings_for(*tokens_store, tmp_path, grad_accum_steps=3)
    warnings: list[str] = []
    with pytest.raises(distributed.WorkerError) as err:
        launch(settings, 2, log=lambda line: None, warn=warnings.append)
    assert not is_transient(err.value)  # as in one process: a retry would refuse it again
    message = str(err.value)
    assert "\n" not in message
    assert re.match(
        r"training with 2 processes failed \(exit 1\): rank [01]: ValueError: grad_accum_steps \(3\)", message
    )
    assert any("Traceback" in line for line in warnings)  # the processes' stderr reached the log
    assert not (tmp_path / CHECKPOINT).exists()


KILLING_WORKER = f"""
import os, signal, sys

from model import train_entry
from model.data import TokenBatches

batch = TokenBatches.train_batch


def train_batch(self, step, micro):
    if step == {KILLED_AT_STEP} and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return batch(self, step, micro)


TokenBatches.train_batch = train_batch
sys.exit(train_entry.main())
"""


@pytest.mark.slow
def test_killed_process_fails_transiently_and_the_retry_resumes_exactly(
    two_processes: PretrainSettings, tokens_store: tuple[Store, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "killing_worker.py").write_text(KILLING_WORKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    settings = settings_for(*tokens_store, tmp_path / "run")
    Path(settings.work).mkdir()
    settings.save(tmp_path / "settings.json")
    with pytest.raises(TransientError, match="training with 2 processes failed"):
        distributed.run_torchrun(
            2,
            "killing_worker",
            [str(tmp_path / "settings.json")],
            on_stdout=lambda line: None,
            on_stderr=lambda line: None,
        )
    assert torch.load(Path(settings.work) / CHECKPOINT, weights_only=True)["step"] == 5
    assert max(r["step"] for r in read_metrics(Path(settings.work) / METRICS)) > 5  # logged past it

    lines: list[str] = []
    result, _ = launch(settings, 2, log=lines.append, warn=lambda line: None)
    assert result.resumed_from == 5
    assert any("resuming from" in line and "step 5/10" in line for line in lines)
    resumed, uninterrupted = load_model(Path(settings.out)), load_model(Path(two_processes.out))
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    got = read_metrics(Path(settings.work) / METRICS)
    assert without_timing(got) == without_timing(read_metrics(Path(two_processes.work) / METRICS))
    assert (Path(settings.out) / RESULT).is_file()


RAISING_WORKER = """
import os, sys

from model import train_entry
from model.data import TokenBatches
from storage import errors

batch = TokenBatches.train_batch


def train_batch(self, step, micro):
    if step == 2 and os.environ["RANK"] == "1":  # rank 0 is then waiting on it in a collective
        raise {error}
    return batch(self, step, micro)


TokenBatches.train_batch = train_batch
sys.exit(train_entry.main())
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("error", "expected", "transient", "reason"),
    [
        ('KeyError("vocab")', "WorkerError", False, "rank 1: KeyError: 'vocab'"),
        ('errors.DataIntegrityError("bad.bin")', "DataIntegrityError", False, "rank 1: DataIntegrityError: bad.bin"),
        ('errors.TransientError("store busy")', "TransientError", True, "rank 1: TransientError: store busy"),
    ],
)
def test_a_process_error_is_classified_as_in_one_process(
    error: str,
    expected: str,
    transient: bool,
    reason: str,
    tokens_store: tuple[Store, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "raising_worker.py").write_text(RAISING_WORKER.format(error=error))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    settings = settings_for(*tokens_store, tmp_path / "run")
    Path(settings.work).mkdir()
    settings.save(tmp_path / "settings.json")
    with pytest.raises(Exception) as err:
        distributed.run_torchrun(
            2,
            "raising_worker",
            [str(tmp_path / "settings.json")],
            on_stdout=lambda line: None,
            on_stderr=lambda line: None,
        )
    # Rank 0 fails too ("Connection closed by peer"), after rank 1: the root cause is rank 1's error.
    assert type(err.value).__name__ == expected
    assert is_transient(err.value) is transient  # the rule Prefect's retries follow
    assert f"training with 2 processes failed (exit 1): {reason}" in str(err.value)


def report(exc: Exception, rank: int, folder: Path) -> None:
    distributed.report_failure(exc, environ={distributed.REPORTS_ENV: str(folder), "RANK": str(rank)})


GLOO_LOST_PEER = RuntimeError(
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:31446. This is typically caused by a remote worker crashing."
)


def test_a_cuda_out_of_memory_in_one_process_is_not_retried(tmp_path: Path) -> None:
    report(GLOO_LOST_PEER, 0, tmp_path)  # even when reported first, a lost peer is never the root cause
    report(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"), 1, tmp_path)
    error = distributed.launch_failure(2, 1, distributed.read_reports(tmp_path), "torchrun's last line")
    assert isinstance(error, distributed.WorkerError) and not is_transient(error)
    assert str(error) == (
        "training with 2 processes failed (exit 1): rank 1: OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 2.00 GiB"
    )


class DamagedShard(DataIntegrityError):
    """A project error class outside storage.errors."""


def test_the_launcher_raises_the_class_one_process_would_have(tmp_path: Path) -> None:
    report(DamagedShard("train.bin: truncated"), 1, tmp_path)
    error = distributed.launch_failure(2, 1, distributed.read_reports(tmp_path), None)
    assert type(error) is DataIntegrityError and not is_transient(error)
    assert str(error).endswith("rank 1: DamagedShard: train.bin: truncated")

    for transient in (TimeoutError("rendezvous store: timed out"), ConnectionResetError("reset")):
        folder = tmp_path / type(transient).__name__
        folder.mkdir()
        report(transient, 0, folder)
        assert is_transient(distributed.launch_failure(2, 1, distributed.read_reports(folder), None))


def test_killed_processes_and_lost_peers_are_transient(tmp_path: Path) -> None:
    # No report: a process killed by a signal (the out-of-memory killer); torchrun's line says which.
    killed = distributed.launch_failure(2, -9, [], "exitcode: -9 (pid: 4242) signal: SIGKILL")
    assert isinstance(killed, TransientError) and str(killed).endswith(
        "exit -9): exitcode: -9 (pid: 4242) signal: SIGKILL"
    )
    # Only the killed process's partners reported: they lost it in a collective.
    report(GLOO_LOST_PEER, 0, tmp_path)
    report(torch.distributed.DistBackendError("NCCL communicator was aborted"), 1, tmp_path)
    lost = distributed.launch_failure(2, 1, distributed.read_reports(tmp_path), None)
    assert isinstance(lost, TransientError) and "rank 0: RuntimeError: [" in str(lost)


def test_torchrun_environment_is_read_and_checked() -> None:
    assert distributed.launch_from_env({}) is None
    launch_ = distributed.launch_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert launch_ == distributed.Launch(rank=3, local_rank=1, world_size=4)
    with pytest.raises(ValueError, match="incomplete torchrun environment: WORLD_SIZE unset"):
        distributed.launch_from_env({"RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="inconsistent torchrun environment: RANK=4"):
        distributed.launch_from_env({"RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "4"})
    # Outside a launch the collectives describe one process.
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_sum([2, 3.5]) == [2.0, 3.5] and distributed.all_reduce_mean(torch.tensor(1.5)) == 1.5
