"""Pretraining a GPT from scratch on a tokens folder, in this process or in several under torchrun.

`pretrain(settings)` runs in the calling process; `launch(settings, nproc)` runs the same in `nproc`
processes (PyTorch DDP) and waits for them:

    python -m torch.distributed.run --standalone --nproc_per_node=N -m model.train_entry SETTINGS.json

Between the two sides: SETTINGS.json (a PretrainSettings); on stdout, rank 0's lines as JSON objects,
{"log": line} or {"record": metrics record}; in `out`, rank 0's final model.pt, model_config.json and
result.json (the TrainResult and the parameter count); a failing process's error class and first line in
a report file (distributed.report_failure), its traceback on stderr.
"""

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model import distributed
from model.checkpoint import save_model
from model.data import TokenBatches
from model.gpt import GPT, GPTConfig
from model.train import METRICS, TrainConfig, TrainResult, resolve_device, train
from storage.errors import DataIntegrityError
from storage.tokens import open_tokens

RESULT = "result.json"


@dataclass(frozen=True)
class PretrainSettings:
    tokens: str  # a tokens version folder: train.bin, val.bin, meta.json
    model: dict[str, Any]  # GPTConfig fields
    train: dict[str, Any]  # TrainConfig fields
    work: str  # checkpoint and metrics.jsonl (resume state)
    out: str  # where a launch's rank 0 writes the final model and result.json

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "PretrainSettings":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def pretrain(
    settings: PretrainSettings,
    *,
    log: Callable[[str], None],
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[GPT, TrainResult]:
    """Build the model from its seed and train it on the tokens folder (resuming from `work`)."""
    folder = Path(settings.tokens)
    cfg = TrainConfig(**settings.train)
    model_config = GPTConfig(**settings.model)
    train_tokens, val_tokens = open_tokens(folder, "train"), open_tokens(folder, "val")
    source = TokenBatches(
        train_tokens,
        val_tokens,
        model_config.block_size,
        cfg.batch_size,
        cfg.seed,
        names=(str(folder / "train.bin"), str(folder / "val.bin")),
    )
    torch.manual_seed(cfg.seed)  # the initial weights, the same in every process
    model = GPT(model_config)
    if distributed.is_main():
        processes = distributed.world_size()
        log(
            f"pretraining {model.num_params() / 1e6:.2f}M parameters on {len(train_tokens)} train / "
            f"{len(val_tokens)} val tokens (vocab padded to {model_config.vocab_size}) in {processes} "
            f"process{'es' if processes > 1 else ''}"
        )
    work = Path(settings.work)
    result = train(model, source, cfg, work, metrics_path=work / METRICS, log=log, on_record=on_record)
    return model, result


# -- several processes ---------------------------------------------------------------------------------


def launch(
    settings: PretrainSettings,
    nproc: int,
    *,
    log: Callable[[str], None],
    warn: Callable[[str], None],
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TrainResult, int]:
    """Run `pretrain` in `nproc` processes under torchrun; (result, parameter count). The final model is in
    `settings.out`. `log` gets rank 0's lines, `warn` the processes' stderr. settings.train's `progress`
    is shown here, from the records, rather than by rank 0 into a pipe."""
    work, out = Path(settings.work), Path(settings.out)
    work.mkdir(parents=True, exist_ok=True)
    (out / RESULT).unlink(missing_ok=True)  # a failed attempt's leftovers are never read as this one's
    progress = bool(settings.train.get("progress"))
    settings = replace(settings, train={**settings.train, "progress": False})
    settings_path = work / "settings.json"
    settings.save(settings_path)

    bar = tqdm(total=settings.train["max_steps"], disable=not progress, unit="step", dynamic_ncols=True)

    def on_line(line: str) -> None:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            log(line)  # a line some library printed
        elif "record" in message:
            record = message["record"]
            bar.update(record["step"] - bar.n)
            if on_record is not None:
                on_record(record)
        else:
            log(str(message.get("log")))

    try:
        distributed.run_torchrun(nproc, __name__, [str(settings_path)], on_stdout=on_line, on_stderr=warn)
    finally:
        bar.close()
    if not (out / RESULT).is_file():
        raise DataIntegrityError(f"{out / RESULT}: missing after {nproc} training processes exited cleanly")
    written = json.loads((out / RESULT).read_text(encoding="utf-8"))
    return TrainResult(**written["result"]), written["params"]


def _send(message: dict[str, Any]) -> None:
    # Raises once the launcher is gone (closed pipe), which ends an orphaned launch.
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """One process of a launch: train, then (rank 0) write the model and result.json into settings.out."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m torch.distributed.run ... -m model.train_entry SETTINGS.json\n")
        return 2
    try:
        settings = PretrainSettings.load(Path(args[0]))
        with distributed.process_group(resolve_device(settings.train.get("device", "auto"))):
            model, result = pretrain(
                settings,
                log=lambda line: _send({"log": line}),
                on_record=lambda record: _send({"record": record}),
            )
            if distributed.is_main():
                out = Path(settings.out)
                save_model(out, model)
                written = {"result": asdict(result), "params": model.num_params()}
                (out / RESULT).write_text(json.dumps(written) + "\n", encoding="utf-8")
    except Exception as exc:  # an interrupt or a signal leaves no report: the launcher takes it as transient
        distributed.report_failure(exc)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
