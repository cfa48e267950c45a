"""The training loop: batches, schedule, learning, metrics, checkpoints and exact resume."""

import errno
import io
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model import train as train_module
from model.data import TokenBatches
from model.gpt import GPT, GPTConfig
from model.train import CHECKPOINT, METRICS, TIMING_FIELDS, TrainConfig, lr_at, plot_losses, read_metrics, train
from storage.errors import ConfigError, DataIntegrityError, DiskFullError

PROJECT = Path(__file__).resolve().parent.parent
VOCAB = 64
BLOCK = 16


# Tiny models train faster on one thread than on two contending ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def repeating_tokens(n: int = 2000, period: int = 8) -> np.ndarray:
    return (np.arange(n) % period).astype(np.uint16)


def tiny_model(dropout: float = 0.0, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def tiny_train_config(**overrides) -> TrainConfig:
    values = dict(
        batch_size=4,
        grad_accum_steps=2,
        max_steps=30,
        learning_rate=1e-2,
        min_lr=1e-3,
        warmup_steps=5,
        eval_interval=10,
        eval_steps=2,
        checkpoint_interval=10,
        log_interval=2,
        seed=3,
        device="cpu",
    )
    return TrainConfig(**{**values, **overrides})


def batches(cfg: TrainConfig, tokens: np.ndarray | None = None) -> TokenBatches:
    tokens = repeating_tokens() if tokens is None else tokens
    return TokenBatches(tokens, tokens[: len(tokens) // 4], BLOCK, cfg.batch_size, cfg.seed)


# -- batches -------------------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_step_and_micro_step() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    source = TokenBatches(tokens, tokens[:100], block_size=8, batch_size=4, seed=1)
    x, y = source.train_batch(5, 1)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    again = TokenBatches(tokens, tokens[:100], block_size=8, batch_size=4, seed=1)
    assert torch.equal(again.train_batch(5, 1)[0], x)
    assert not torch.equal(source.train_batch(5, 0)[0], x)
    assert not torch.equal(source.train_batch(6, 1)[0], x)
    other_seed = TokenBatches(tokens, tokens[:100], block_size=8, batch_size=4, seed=2)
    assert not torch.equal(other_seed.train_batch(5, 1)[0], x)
    # Evaluation batches are fixed: the same at every evaluation, and val ones come from val data.
    first = [b[0] for b in source.eval_batches("val", 3)]
    assert all(torch.equal(a, b[0]) for a, b in zip(first, source.eval_batches("val", 3), strict=True))
    assert all(int(b.max()) < 100 for b in first)


def test_token_array_shorter_than_one_window_is_refused() -> None:
    with pytest.raises(DataIntegrityError, match=r"val\.bin: holds 8 tokens, fewer than the 9"):
        TokenBatches(np.arange(100), np.arange(8), block_size=8, batch_size=2, seed=0)


# -- schedule and config -------------------------------------------------------------------------------


def test_warmup_then_cosine_decay_to_min_lr() -> None:
    cfg = tiny_train_config(max_steps=110, warmup_steps=10, learning_rate=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(4, cfg) == pytest.approx(5 / 11)
    warmup = [lr_at(s, cfg) for s in range(10)]
    assert warmup == sorted(warmup)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # peak when warmup ends
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the decay: (peak + min) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert decay == sorted(decay, reverse=True)
    assert min(decay) >= 0.1


def test_bad_train_config_lists_every_problem() -> None:
    # Each field's own range first (all of them in one error), then the checks between fields (likewise).
    with pytest.raises(ValueError) as err:
        tiny_train_config(beta2=1.0, device="tpu", optimizer="sgd")
    message = str(err.value)
    assert "beta2\n  Input should be less than 1" in message
    assert "device\n  Input should be 'auto', 'cpu', 'cuda' or 'mps'" in message
    assert "optimizer\n  Input should be 'adamw' or 'muon'" in message
    with pytest.raises(ValueError) as err:
        tiny_train_config(max_steps=10, warmup_steps=10, min_lr=1.0)
    for expected in ("warmup_steps (10) must be < max_steps (10)", "min_lr (1.0) must be <= learning_rate"):
        assert expected in str(err.value)


# -- learning and metrics ------------------------------------------------------------------------------


def test_loss_goes_down_on_a_repeating_sequence(tmp_path: Path) -> None:
    cfg = tiny_train_config(max_steps=40, eval_interval=20, checkpoint_interval=100)
    lines: list[str] = []
    result = train(tiny_model(), batches(cfg), cfg, tmp_path, log=lines.append)
    records = read_metrics(tmp_path / METRICS)
    # ln(64) = 4.16 nats for an untrained model; the 8-token cycle is fully predictable.
    assert records[0]["train_loss"] > 3.0
    assert result.val_loss < 0.5 and result.train_eval_loss < 0.5
    assert result.best_val_loss == min(r["val_loss"] for r in records if "val_loss" in r)
    assert result.steps == 40
    assert result.tokens_seen == 40 * cfg.grad_accum_steps * cfg.batch_size * BLOCK
    assert any("step 40/40" in line and "val" in line for line in lines)


def test_metrics_lines_cover_logged_and_evaluated_steps(tmp_path: Path) -> None:
    cfg = tiny_train_config(max_steps=25, log_interval=4, eval_interval=10)
    train(tiny_model(), batches(cfg), cfg, tmp_path)
    records = read_metrics(tmp_path / METRICS)
    assert [r["step"] for r in records] == [4, 8, 10, 12, 16, 20, 24, 25]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 25]
    for record in records:
        assert {"step", "train_loss", "lr", "tokens_per_s"} <= record.keys()
        assert math.isfinite(record["train_loss"]) and record["tokens_per_s"] > 0
    assert all("train_eval_loss" in r for r in records if "val_loss" in r)


def test_records_time_the_run_and_the_steps_apart(tmp_path: Path) -> None:
    cfg = tiny_train_config(max_steps=20, log_interval=5, eval_interval=10, eval_steps=40)
    result = train(tiny_model(), batches(cfg), cfg, tmp_path)
    records = read_metrics(tmp_path / METRICS)
    times = [r["time_s"] for r in records]
    assert times == sorted(times) and 0 < times[-1] <= result.seconds
    # Evaluations (40 batches per split, twice) are outside the steps' time, inside the run's.
    assert 0 < result.step_seconds < result.seconds
    # On the CPU the utilisation is against the measured matmul peak of the loop's thread count.
    assert all(0 < r["mfu"] for r in records)


def test_loss_plot_is_a_png(tmp_path: Path) -> None:
    records = [{"step": 1, "train_loss": 4.0}, {"step": 2, "train_loss": 3.0, "val_loss": 3.5, "train_eval_loss": 3.1}]
    plot_losses(records, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- checkpoints and resume ----------------------------------------------------------------------------

RESUME_CONFIG = dict(max_steps=30, checkpoint_interval=10, log_interval=1, eval_interval=5)
STUCK_AT_STEP = 12  # past the checkpoint at step 10, so the killed run logged steps it must not keep


class StuckAfterCheckpoint:
    """A batch source that hangs when asked for one step's batch, so the test can kill the run there."""

    def __init__(self, source: TokenBatches, marker: Path) -> None:
        self.source, self.marker = source, marker

    def train_batch(self, step: int, micro: int):
        if step == STUCK_AT_STEP:
            self.marker.touch()
            time.sleep(600)
        return self.source.train_batch(step, micro)

    def eval_splits(self):
        return self.source.eval_splits()

    def eval_batches(self, split: str, count: int):
        return self.source.eval_batches(split, count)


def run_until_stuck(folder: str, optimizer: str) -> None:
    """Entry point of the subprocess that the resume test kills with SIGKILL."""
    torch.set_num_threads(1)
    cfg = tiny_train_config(**RESUME_CONFIG, optimizer=optimizer)
    train(tiny_model(dropout=0.1), StuckAfterCheckpoint(batches(cfg), Path(folder) / "stuck"), cfg, Path(folder))


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path: Path, optimizer: str) -> None:
    cfg = tiny_train_config(**RESUME_CONFIG, optimizer=optimizer)
    reference = tiny_model(dropout=0.1)
    train(reference, batches(cfg), cfg, tmp_path / "uninterrupted")

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    code = f"import sys; sys.path.insert(0, {str(PROJECT / 'tests')!r}); import test_train; "
    code += "test_train.run_until_stuck(*sys.argv[1:])"
    process = subprocess.Popen([sys.executable, "-c", code, str(resumed_dir), optimizer], cwd=PROJECT)
    try:
        deadline = time.monotonic() + 90
        while not (resumed_dir / "stuck").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the training subprocess ended (rc {process.returncode}) or never reached step 12")
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_steps = [r["step"] for r in read_metrics(resumed_dir / METRICS)]
    assert max(killed_steps) == STUCK_AT_STEP  # the killed run had logged past its checkpoint

    # A fresh model with other initial weights: everything must come from the checkpoint.
    resumed = tiny_model(dropout=0.1, seed=99)
    lines: list[str] = []
    result = train(resumed, batches(cfg), cfg, resumed_dir, log=lines.append)
    assert result.resumed_from == 10
    assert any("resuming from" in line and "step 10/30" in line for line in lines)

    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    expected = read_metrics(tmp_path / "uninterrupted" / METRICS)
    got = read_metrics(resumed_dir / METRICS)
    assert [r["step"] for r in got] == list(range(1, 31))  # no step twice, none missing
    assert without_timing(got) == without_timing(expected)
    optimizer_a = torch.load(tmp_path / "uninterrupted" / CHECKPOINT, weights_only=True)["optimizer"]["state"]
    optimizer_b = torch.load(resumed_dir / CHECKPOINT, weights_only=True)["optimizer"]["state"]
    assert optimizer_a.keys() == optimizer_b.keys() and len(optimizer_a) == len(list(reference.parameters()))
    # Muon's momentum buffers (the hidden matrices) are in the checkpoint, beside AdamW's moments (the rest).
    assert any("momentum_buffer" in state for state in optimizer_a.values()) == (optimizer == "muon")
    for key, state in optimizer_a.items():
        assert state.keys() == optimizer_b[key].keys()
        assert all(torch.equal(state[name], optimizer_b[key][name]) for name in state)


def test_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    cfg = tiny_train_config(max_steps=10)
    model = tiny_model()
    first = train(model, batches(cfg), cfg, tmp_path)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    again = tiny_model(seed=5)
    second = train(again, batches(cfg), cfg, tmp_path)
    assert second.resumed_from == 10 and second.steps == 10
    assert second.val_loss == first.val_loss
    assert all(torch.equal(weights[k], v) for k, v in again.state_dict().items())
    assert [r["step"] for r in read_metrics(tmp_path / METRICS)] == [2, 4, 6, 8, 10]


def test_checkpoint_of_a_different_config_is_refused(tmp_path: Path) -> None:
    cfg = tiny_train_config(max_steps=10)
    train(tiny_model(), batches(cfg), cfg, tmp_path)
    other = tiny_train_config(max_steps=10, learning_rate=5e-3)
    with pytest.raises(ConfigError, match=f"{tmp_path / CHECKPOINT}: checkpoint of a different"):
        train(tiny_model(), batches(other), other, tmp_path)
    bigger = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=3, n_head=2, n_embd=32))
    with pytest.raises(ConfigError, match="checkpoint of a different"):
        train(bigger, batches(cfg), cfg, tmp_path)
    # Only how the run executes changed: the checkpoint is still this run's.
    same = tiny_train_config(max_steps=10, progress=True)
    assert train(tiny_model(), batches(same), same, tmp_path).resumed_from == 10


def test_damaged_checkpoint_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    cfg = tiny_train_config(max_steps=10)
    with pytest.raises(DataIntegrityError, match=f"{tmp_path / CHECKPOINT}: unreadable checkpoint"):
        train(tiny_model(), batches(cfg), cfg, tmp_path)


def test_diverging_run_fails_with_a_clear_error(tmp_path: Path) -> None:
    # learning_rate's bound (<= 1) keeps ten steps finite, so the weights are made to overflow instead.
    cfg = tiny_train_config(max_steps=10, grad_clip=0.0, log_interval=1)
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("inf"))
    with pytest.raises(ConfigError, match="training diverged: loss is nan at step 1"):
        train(model, batches(cfg), cfg, tmp_path)


class FillsUp(io.FileIO):
    """A file on a disk with `room` bytes left: the write past them fails as a full disk does."""

    room = 4096

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_disk_full_mid_checkpoint_keeps_the_last_whole_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_train_config(max_steps=20, checkpoint_interval=10)
    reference = tiny_model()
    train(reference, batches(cfg), cfg, tmp_path / "uninterrupted")

    saves = []

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        saves.append(path)
        return FillsUp(path, mode) if len(saves) > 1 else open(path, mode, *args, **kwargs)

    monkeypatch.setattr("model.checkpoint.open", open_on_a_filling_disk, raising=False)
    folder = tmp_path / "full"
    with pytest.raises(DiskFullError, match=f"{folder / CHECKPOINT}: not written, no space left"):
        train(tiny_model(), batches(cfg), cfg, folder)
    assert len(saves) == 2  # the checkpoint at step 20 ran out of space part-way
    assert sorted(path.name for path in folder.iterdir()) == [CHECKPOINT, METRICS]  # no partial file left
    assert torch.load(folder / CHECKPOINT, weights_only=True)["step"] == 10

    monkeypatch.undo()  # space freed: the rerun resumes from the whole checkpoint and ends where it would have
    resumed = tiny_model(seed=99)
    assert train(resumed, batches(cfg), cfg, folder).resumed_from == 10
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


# -- threads -------------------------------------------------------------------------------------------


class ThreadsSeen:
    """A batch source that notes the intra-op thread count the loop runs on."""

    def __init__(self, source: TokenBatches) -> None:
        self.source, self.threads = source, set()

    def train_batch(self, step: int, micro: int):
        self.threads.add(torch.get_num_threads())
        return self.source.train_batch(step, micro)

    def eval_splits(self):
        return self.source.eval_splits()

    def eval_batches(self, split: str, count: int):
        return self.source.eval_batches(split, count)


def test_the_weights_do_not_depend_on_the_callers_thread_count(tmp_path: Path) -> None:
    # Even this tiny model's weights move by ~5e-6 when the same 10 steps run on 2 threads instead of 1.
    cfg = tiny_train_config(max_steps=10)
    runs, before = {}, torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)  # as OMP_NUM_THREADS, the core count or an affinity mask would
            model, source = tiny_model(), ThreadsSeen(batches(cfg))
            result = train(model, source, cfg, tmp_path / str(threads))
            runs[threads] = model.state_dict(), source.threads, result, torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    for name, tensor in runs[1][0].items():
        assert torch.equal(tensor, runs[2][0][name]), name
    for threads, (_, seen, result, after) in runs.items():
        assert seen == {train_module.CPU_THREADS} == {result.cpu_threads}  # recorded in the result
        assert after == threads  # the caller's own setting is back
