"""Pretraining a GPT from scratch on a tokens folder, in this process or in several under torchrun, on one
machine or on several.

`pretrain(settings)` runs in the calling process; `launch(settings, nproc)` runs the same in `nproc`
processes (PyTorch DDP) and waits for them:

    python -m torch.distributed.run --standalone --nproc_per_node=N -m model.train_entry SETTINGS.json

Between the two sides: SETTINGS.json (a PretrainSettings); on stdout, rank 0's lines as JSON objects,
{"log": line} or {"record": metrics record}; in `out`, rank 0's final model.pt, model_config.json and
result.json (the TrainResult and the parameter count); a failing process's error class and first line in
a report file (distributed.report_failure), its traceback on stderr.

Several machines (`launch(settings, nproc, nnodes=N, rdzv_endpoint="HOST:PORT")`): the machine that runs
the launch is the lead; it runs torchrun with a c10d rendezvous at HOST:PORT (an address of the lead that
every node reaches; the lead hosts the rendezvous there) and logs, as one line, the command each other
node runs to join:

    python -m model.train_entry --join SETTINGS.json --nnodes N --rdzv-endpoint HOST:PORT --nproc-per-node P

It wraps torchrun the same way. On a cluster:
- the tokens folder, `work` and `out` (in gptflow: the store) must be on a filesystem every node mounts at
  the same path, with the same Python environment: the nodes read the one settings file the lead wrote
  into `work`, and rank 0 writes the checkpoints and outputs into it;
- the rendezvous id is a hash of that file, so nodes started with another run's settings never meet;
- torchrun's c10d rendezvous needs the TCP port open between the nodes, and the NCCL or gloo connections
  that follow need the nodes to reach each other's addresses on any port (or NCCL_SOCKET_IFNAME / GLOO_
  SOCKET_IFNAME set to the right interface);
- the lead's processes take ranks 0, 1, ...: rank 0's log and progress reach the lead's log, and the
  result is read there;
- a process that fails on any node is reported by the lead with its rank, host and error line (the nodes
  write their reports into `work`); the launch then ends on every node, and a retry of the lead's stage
  waits for the others to run their join command again;
- if not every node joins within `rdzv_timeout` seconds (default: torchrun's 600), the launch fails with
  one line naming the endpoint.
"""

import argparse
import hashlib
import json
import logging
import shlex
import shutil
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
from storage.errors import ConfigError, DataIntegrityError, GptflowError
from storage.tokens import open_tokens

RESULT = "result.json"
SETTINGS = "settings.json"  # in `work`: what a launch's processes, on every node, read
FAILURES = "failures"  # in `work`: the failure reports of a multi-node launch's processes, from every node

# This module's name for torchrun's -m, also when it runs as `python -m model.train_entry --join` (when
# __name__ is "__main__").
MODULE = __spec__.name
_logger = logging.getLogger(MODULE)


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
        processes, nodes = distributed.world_size(), distributed.node_count()
        log(
            f"pretraining {model.num_params() / 1e6:.2f}M parameters on {len(train_tokens)} train / "
            f"{len(val_tokens)} val tokens (vocab padded to {model_config.vocab_size}) in {processes} "
            f"process{'es' if processes > 1 else ''}" + (f" on {nodes} nodes" if nodes > 1 else "")
        )
    work = Path(settings.work)
    result = train(model, source, cfg, work, metrics_path=work / METRICS, log=log, on_record=on_record)
    return model, result


# -- several processes ---------------------------------------------------------------------------------


def rendezvous_id(settings_path: Path) -> str:
    """The c10d rendezvous id of a launch: a hash of its settings file, which every node reads."""
    return hashlib.sha256(Path(settings_path).read_bytes()).hexdigest()[:16]


def join_command(settings_path: Path, rendezvous: distributed.Rendezvous, nproc: int) -> list[str]:
    """What each other node of a multi-node launch runs (this interpreter: the nodes share the environment)."""
    return [
        sys.executable,
        "-m",
        MODULE,
        "--join",
        str(settings_path),
        "--nnodes",
        str(rendezvous.nnodes),
        "--rdzv-endpoint",
        rendezvous.endpoint,
        "--nproc-per-node",
        str(nproc),
        "--rdzv-timeout",
        str(rendezvous.timeout_s),
    ]


def launch(
    settings: PretrainSettings,
    nproc: int,
    *,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_timeout: int = distributed.RDZV_TIMEOUT_S,
    log: Callable[[str], None],
    warn: Callable[[str], None],
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TrainResult, int]:
    """Run `pretrain` in `nproc` processes under torchrun; (result, parameter count). The final model is in
    `settings.out`. `log` gets rank 0's lines, `warn` the processes' stderr. settings.train's `progress`
    is shown here, from the records, rather than by rank 0 into a pipe.

    With nnodes > 1 these are the lead node's `nproc` processes of a launch over `nnodes` machines that meet
    at the c10d rendezvous `rdzv_endpoint` (HOST:PORT) within `rdzv_timeout` seconds; the first line logged
    is the command each other node runs (see the module docstring)."""
    if nnodes < 1:
        raise ConfigError(f"nnodes={nnodes}: must be at least 1")
    if nnodes == 1 and rdzv_endpoint is not None:
        raise ConfigError(f"rdzv_endpoint {rdzv_endpoint!r} is set but nnodes is 1: a rendezvous is for 2+ nodes")
    if nnodes > 1 and rdzv_endpoint is None:
        raise ConfigError(f"nnodes={nnodes} needs rdzv_endpoint (HOST:PORT of the lead node, reachable from all)")
    if rdzv_endpoint is not None:
        distributed.parse_endpoint(rdzv_endpoint)  # before any file is written
    work, out = Path(settings.work), Path(settings.out)
    work.mkdir(parents=True, exist_ok=True)
    (out / RESULT).unlink(missing_ok=True)  # a failed attempt's leftovers are never read as this one's
    progress = bool(settings.train.get("progress"))
    settings = replace(settings, train={**settings.train, "progress": False})
    settings_path = work / SETTINGS
    settings.save(settings_path)
    rendezvous, reports = None, None
    if nnodes > 1:
        rendezvous = distributed.Rendezvous(nnodes, rdzv_endpoint, rendezvous_id(settings_path), rdzv_timeout)
        reports = work / FAILURES
        shutil.rmtree(reports, ignore_errors=True)  # a failed attempt's reports are never read as this one's
        reports.mkdir()
        command = shlex.join(join_command(settings_path, rendezvous, nproc))
        log(f"this node leads a {nnodes}-node launch; run on each other node: {command}")

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
        distributed.run_torchrun(
            nproc,
            MODULE,
            [str(settings_path)],
            on_stdout=on_line,
            on_stderr=warn,
            rendezvous=rendezvous,
            reports=reports,
        )
    finally:
        bar.close()
    if not (out / RESULT).is_file():
        raise DataIntegrityError(f"{out / RESULT}: missing after the training processes exited cleanly")
    written = json.loads((out / RESULT).read_text(encoding="utf-8"))
    return TrainResult(**written["result"]), written["params"]


def _send(message: dict[str, Any]) -> None:
    # Raises once the launcher is gone (closed pipe), which ends an orphaned launch.
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def join(argv: list[str]) -> int:
    """A node joining a multi-node launch that a lead node started (the command its launch logged): this
    node's processes under torchrun, until the launch ends. Exit 0 when it succeeded, 1 when it failed, 2 for
    bad arguments; the reason is one line on stderr."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE} --join", description="Join a multi-node pretraining launch from another node."
    )
    parser.add_argument("settings", type=Path, help="the launch's settings file (in its work folder, shared)")
    parser.add_argument("--nnodes", type=int, required=True, help="machines in the launch, the lead included")
    parser.add_argument("--rdzv-endpoint", required=True, help="HOST:PORT of the lead node's rendezvous")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes on this machine (one per GPU)")
    parser.add_argument(
        "--rdzv-timeout", type=int, default=distributed.RDZV_TIMEOUT_S, help="seconds to wait for all the nodes"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node {args.nproc_per_node}: must be at least 1")
        if not args.settings.is_file():
            raise ConfigError(f"{args.settings}: no such settings file (the lead writes it as its launch starts)")
        try:
            settings = PretrainSettings.load(args.settings)
        except (OSError, ValueError, TypeError) as error:  # unreadable, not JSON, not a PretrainSettings
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise ConfigError(f"{args.settings}: not a pretraining settings file ({reason})") from None
        rendezvous = distributed.Rendezvous(
            args.nnodes, args.rdzv_endpoint, rendezvous_id(args.settings), args.rdzv_timeout
        )
        reports = Path(settings.work) / FAILURES
        reports.mkdir(parents=True, exist_ok=True)
        _logger.info(
            f"joining the {rendezvous.nnodes}-node launch at {rendezvous.endpoint} (id {rendezvous.run_id}) "
            f"with {args.nproc_per_node} process{'es' if args.nproc_per_node > 1 else ''}"
        )
        distributed.run_torchrun(
            args.nproc_per_node,
            MODULE,
            [str(args.settings)],
            on_stdout=_logger.info,  # rank 0 runs on the lead: only what libraries print arrives here
            on_stderr=_logger.warning,
            rendezvous=rendezvous,
            lead=False,
            reports=reports,
        )
    except GptflowError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2 if isinstance(exc, ConfigError) else 1
    _logger.info("the launch finished: the lead node has the result")
    return 0


def main(argv: list[str] | None = None) -> int:
    """One process of a launch: train, then (rank 0) write the model and result.json into settings.out.
    With --join first: a node joining a multi-node launch (`join`)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--join"]:
        return join(args[1:])
    if len(args) != 1:
        sys.stderr.write(
            "usage: python -m torch.distributed.run ... -m model.train_entry SETTINGS.json\n"
            "       python -m model.train_entry --join SETTINGS.json --nnodes N --rdzv-endpoint HOST:PORT ...\n"
        )
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
