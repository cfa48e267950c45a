"""Stage pretrain, run through STAGE.run on a fake tokens version."""

from pathlib import Path

import builders
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from model.checkpoint import load_model
from model.train import CHECKPOINT, read_metrics
from storage.errors import ConfigError, DataIntegrityError
from storage.store import Store
from tasks.pretrain import STAGE, PretrainConfig

VOCAB = 40  # padded to 64 in the model


# Tiny models train faster on one thread than on two contending ones.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def publish_tokens(store: Store, train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int = VOCAB) -> str:
    return builders.publish_tokens(store.root, train_ids, val_ids, vocab_size=vocab_size, eot_token=vocab_size - 1)


def cycle(n: int, period: int = 7) -> np.ndarray:
    return (np.arange(n) % period).astype(np.uint16)


def tiny_config(**overrides) -> PretrainConfig:
    values = dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=16,
        batch_size=4,
        max_steps=20,
        warmup_steps=2,
        learning_rate=1e-2,
        eval_interval=10,
        eval_steps=2,
        checkpoint_interval=10,
        log_interval=5,
        device="cpu",
    )
    return PretrainConfig(**{**values, **overrides})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_pretrain_publishes_the_contract_files_and_is_reused(store: Store) -> None:
    tokens = publish_tokens(store, cycle(3000), cycle(500))
    ref = STAGE.run(store.root, tiny_config(), {"tokens": tokens})
    assert not ref.reused
    folder = store.path("pretrain", ref.version)
    for name in ("model.pt", "model_config.json", "metrics.jsonl", "loss.png", "manifest.json"):
        assert (folder / name).is_file(), name

    records = read_metrics(folder / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all("train_loss" in r for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]

    model = load_model(folder)
    assert model.config.vocab_size == 64 and model.config.block_size == 16
    metrics = store.manifest("pretrain", ref.version)["metrics"]
    assert metrics["steps"] == 20 and metrics["device"] == "cpu"
    assert metrics["tokens_seen"] == 20 * 4 * 16
    assert metrics["params"] == model.num_params()
    assert metrics["val_loss"] == records[-1]["val_loss"] < 2.0  # well below ln(40): the cycle is being learned
    assert metrics["best_val_loss"] <= metrics["val_loss"]
    assert not (store.stage_dir("pretrain") / ".work" / ref.version).exists()  # scratch cleared

    # Same config and tokens: nothing is trained again; runtime fields do not change the version.
    again = STAGE.run(store.root, tiny_config(progress=True, device="auto"), {"tokens": tokens})
    assert again.reused and again.version == ref.version
    assert STAGE.run(store.root, tiny_config(seed=2), {"tokens": tokens}).version != ref.version


def test_the_same_version_has_the_same_weights_whatever_the_thread_count(tmp_path: Path) -> None:
    # The machine's thread setting is not the loop's (cpu_threads is): it must not change the bits.
    sha256, before = {}, torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)  # as the machine's cores or OMP_NUM_THREADS would set it
            store = Store(tmp_path / f"store-{threads}")
            ref = STAGE.run(store.root, tiny_config(), {"tokens": publish_tokens(store, cycle(3000), cycle(500))})
            sha256[threads] = (ref.version, store.manifest("pretrain", ref.version)["files"]["model.pt"]["sha256"])
    finally:
        torch.set_num_threads(before)
    assert sha256[1] == sha256[2]
    assert Store(tmp_path / "store-1").manifest("pretrain", sha256[1][0])["metrics"]["cpu_threads"] == 1


def test_the_version_names_the_device_precision_threads_and_torch() -> None:
    cfg = tiny_config().model_copy(update={"device": "cpu"})
    environment = STAGE.environment_of(cfg)
    assert environment["device"] == "cpu" and environment["precision"] == "fp32"
    assert environment["libraries"]["torch"] == torch.__version__
    assert STAGE.version(cfg.model_copy(update={"cpu_threads": 2}), {"tokens": "t"}) != STAGE.version(
        cfg, {"tokens": "t"}
    )
    assert STAGE.version(cfg.model_copy(update={"nproc": 1, "progress": True}), {"tokens": "t"}) == STAGE.version(
        cfg, {"tokens": "t"}
    )


def test_a_failed_attempt_resumes_from_its_checkpoint(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = publish_tokens(store, cycle(3000), cycle(500))

    def disk_full(folder: Path, model: object) -> None:
        raise OSError("no space left")

    monkeypatch.setattr("tasks.pretrain.save_model", disk_full)
    with pytest.raises(OSError, match="no space left"):
        STAGE.run(store.root, tiny_config(), {"tokens": tokens})
    version = STAGE.version(tiny_config(), {"tokens": tokens})
    assert (store.stage_dir("pretrain") / ".work" / version / CHECKPOINT).is_file()
    assert not store.has("pretrain", version)

    monkeypatch.undo()
    ref = STAGE.run(store.root, tiny_config(), {"tokens": tokens})
    metrics = store.manifest("pretrain", ref.version)["metrics"]
    assert metrics["resumed_from_step"] == 20  # nothing was trained twice
    assert [r["step"] for r in read_metrics(store.path("pretrain", ref.version) / "metrics.jsonl")] == [5, 10, 15, 20]


def test_token_ids_beyond_the_vocabulary_are_refused(store: Store) -> None:
    train_ids = cycle(3000)
    train_ids[100] = VOCAB + 3
    tokens = publish_tokens(store, train_ids, cycle(500))
    with pytest.raises(DataIntegrityError, match=r"train\.bin: holds token id 43, meta.json says vocab_size 40"):
        STAGE.run(store.root, tiny_config(), {"tokens": tokens})


def test_validation_split_shorter_than_a_block_is_refused(store: Store) -> None:
    tokens = publish_tokens(store, cycle(3000), cycle(10))
    with pytest.raises(DataIntegrityError, match=r"val\.bin: holds 10 tokens, fewer than the 17"):
        STAGE.run(store.root, tiny_config(), {"tokens": tokens})


def test_bad_config_lists_every_problem() -> None:
    with pytest.raises(ValueError) as err:
        tiny_config(n_embd=30, n_head=4, warmup_steps=50, max_steps=20, min_lr=0.5)
    message = str(err.value)
    assert "n_embd (30) must be divisible by n_head (4)" in message
    assert "warmup_steps (50) must be < max_steps (20)" in message
    assert "min_lr (0.5) must be <= learning_rate (0.01)" in message
    with pytest.raises(ValueError, match="device"):
        tiny_config(device="tpu")


def test_more_processes_than_gpus_is_refused_before_training() -> None:
    from tasks.pretrain import check_processes_fit

    check_processes_fit(4, torch.device("cpu"))  # gloo processes share the CPU: any count is allowed
    if torch.cuda.is_available():
        check_processes_fit(torch.cuda.device_count(), torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"pretrain.nproc=\d+ needs \d+ CUDA devices"):
        check_processes_fit(torch.cuda.device_count() + 1, torch.device("cuda"))


def test_several_nodes_need_a_rendezvous_endpoint() -> None:
    def problem(**overrides) -> str:
        with pytest.raises(ValidationError) as err:
            tiny_config(**overrides)
        (error,) = err.value.errors()
        assert "\n" not in error["msg"]
        return error["msg"]

    assert "nnodes (2) > 1 needs rdzv_endpoint" in problem(nnodes=2)
    assert "rdzv_endpoint 'head-node': expected HOST:PORT" in problem(nnodes=2, rdzv_endpoint="head-node")
    assert "is set but nnodes is 1" in problem(rdzv_endpoint="10.0.0.1:29500")
    # Every process of every node runs an equal share of a step's micro-batches.
    assert "grad_accum_steps (2) must be divisible by nproc x nnodes (4)" in problem(
        nnodes=2, nproc=2, grad_accum_steps=2, rdzv_endpoint="10.0.0.1:29500"
    )
    cfg = tiny_config(nnodes=2, grad_accum_steps=2, rdzv_endpoint="10.0.0.1:29500")
    # How many machines train, and where they meet, do not change what is trained.
    assert {"nnodes", "rdzv_endpoint"} <= PretrainConfig.RUNTIME_FIELDS
    assert STAGE.version(cfg, {"tokens": "t"}) == STAGE.version(tiny_config(grad_accum_steps=2), {"tokens": "t"})


def test_a_multi_node_run_is_launched_with_its_nodes_and_endpoint(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def launch(settings, nproc, **kwargs):
        calls.append((nproc, {k: v for k, v in kwargs.items() if k in ("nnodes", "rdzv_endpoint")}))
        raise ConfigError("launch stopped here")

    monkeypatch.setattr("tasks.pretrain.launch", launch)
    tokens = publish_tokens(store, cycle(3000), cycle(500))
    cfg = tiny_config(nnodes=3, grad_accum_steps=3, rdzv_endpoint="10.0.0.1:29500")
    with pytest.raises(ConfigError, match="launch stopped here"):
        STAGE.run(store.root, cfg, {"tokens": tokens})
    assert calls == [(1, {"nnodes": 3, "rdzv_endpoint": "10.0.0.1:29500"})]
