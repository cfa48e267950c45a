"""Data-parallel training over several processes: joining a torchrun launch, the few collectives the training
loop needs, and launching torchrun from a parent process.

torchrun starts one process per device and tells each its place through the environment (RANK, LOCAL_RANK,
WORLD_SIZE, and MASTER_ADDR/MASTER_PORT for the rendezvous). Outside a launch, or before `process_group`
is entered, everything here describes a single process: world_size() is 1, reductions return their input
and barrier() returns at once, so the training loop calls them unconditionally.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from storage import errors

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The folder where a failing process reports its error (report_failure), one JSON file per rank: the launcher
# (run_torchrun) names a fresh one in each launch's environment.
REPORTS_ENV = "GPTFLOW_FAILURE_REPORTS"
# gloo reports a lost peer as a plain RuntimeError from its TCP transport ("[.../gloo/transport/tcp/pair.cc:553]
# Connection closed by peer ..."); NCCL and the rendezvous raise torch.distributed.DistError subclasses.
_GLOO_TRANSPORT = re.compile(r"gloo/transport/|Connection (closed|reset) by peer")


class WorkerError(errors.GptflowError):
    """A launched process failed on an error that is neither gptflow's own nor a connection fault (a KeyError,
    a CUDA out-of-memory RuntimeError): one process fails at once on such an error, so a launch does too (it
    is no TransientError). The message carries the process's rank and `TypeName: message`."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int  # across every machine
    local_rank: int  # on this machine: the GPU it uses
    world_size: int


def launch_from_env(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The torchrun launch this process belongs to, or None for a plain single process."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if not any(name in environ for name in names):
        return None
    missing = [name for name in names if name not in environ]
    if missing:
        raise errors.ConfigError(f"incomplete torchrun environment: {', '.join(missing)} unset")
    try:
        rank, local_rank, world = (int(environ[name]) for name in names)
    except ValueError:
        values = ", ".join(f"{name}={environ[name]!r}" for name in names)
        raise errors.ConfigError(f"torchrun environment is not integers: {values}") from None
    if not 0 <= local_rank <= rank < world:
        raise errors.ConfigError(
            f"inconsistent torchrun environment: RANK={rank} LOCAL_RANK={local_rank} WORLD_SIZE={world}"
        )
    return Launch(rank, local_rank, world)


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join the torchrun launch's process group for the life of the block; yield the device to train on.

    NCCL on CUDA, each process on the GPU numbered by its LOCAL_RANK; gloo on the CPU. Without a launch the
    block runs as a single process on `device`. The group is destroyed on the way out, error or not.
    """
    launch = launch_from_env()
    if launch is None:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=launch.rank, world_size=launch.world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size)
    try:
        yield device
        barrier()  # no process tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and shows progress."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL reduces only tensors on this process's GPU; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over every process (float64: token counts stay exact up to 2**53)."""
    if not is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a scalar over every process (reading a device tensor waits for the device)."""
    if not is_initialized():
        return float(value)
    (total,) = all_reduce_sum([float(value)])
    return total / world_size()


def report_failure(exc: Exception, environ: Mapping[str, str] = os.environ) -> None:
    """Tell the launcher why this process fails: <REPORTS_ENV>/rank-<RANK>.json holds the error's type, its
    first line, how a single process would classify it (`kind`) and when it was raised. Written (atomically)
    before the process exits; nothing when no launcher named a folder (torchrun started by hand).

    kind: "gptflow" (its class in storage.errors, the nearest in its MRO, is `class`), "transient"
    (ConnectionError, TimeoutError), "collective" (a torch.distributed error or gloo's lost connection: a
    peer that died, a lost rendezvous; never the root cause when another process reported one), or "other".
    """
    folder = environ.get(REPORTS_ENV)
    if not folder:
        return
    process = int(environ.get("RANK", "0"))
    report = {"rank": process, "type": type(exc).__name__, "message": (str(exc).splitlines() or [""])[0]}
    if isinstance(exc, errors.GptflowError):
        owned = next(cls for cls in type(exc).__mro__ if getattr(errors, cls.__name__, None) is cls)
        report.update({"kind": "gptflow", "class": owned.__name__})
    elif isinstance(exc, ConnectionError | TimeoutError):
        report["kind"] = "transient"
    elif isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and _GLOO_TRANSPORT.search(str(exc))):
        report["kind"] = "collective"
    else:
        report["kind"] = "other"
    report["time"] = time.time()  # the processes of a launch share this machine's clock
    path = Path(folder) / f"rank-{process}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(report) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:  # the traceback still reaches stderr; the launcher then sees no report
        sys.stderr.write(f"could not write the failure report {path}: {error}\n")


# -- launching -----------------------------------------------------------------------------------------


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """One machine, `nproc` processes, a free rendezvous port chosen by torchrun (--standalone); this
    interpreter, so the processes run in the same environment as the caller."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", module, *args]


def _child_env(nproc: int, reports: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[REPORTS_ENV] = str(reports)
    # The project importable wherever the caller's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    # Share the cores instead of each process taking all of them (torchrun would set 1, with a warning).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def read_reports(folder: Path) -> list[dict[str, Any]]:
    """The processes' failure reports (report_failure), first raised first."""
    reports = []
    for path in sorted(Path(folder).glob("rank-*.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # written by os.replace, so whole or absent; anything else is no report
        if isinstance(report, dict):
            reports.append(report)
    return sorted(reports, key=lambda report: report.get("time", 0.0))


def launch_failure(nproc: int, returncode: int, reports: Sequence[dict[str, Any]], last_line: str | None) -> Exception:
    """The one error a failed launch raises: the first process's error that is not a failed collective,
    classified as in one process (tasks/stage.py `is_transient`).

    - a gptflow error: the same class (DataIntegrityError, ConfigError, TransientError, ...);
    - a ConnectionError or TimeoutError: TransientError;
    - any other error (KeyError, ValueError, a CUDA out-of-memory RuntimeError): WorkerError, not retried.

    With no such report, the processes were killed (by a signal, the out-of-memory killer) or lost a peer or
    the rendezvous: TransientError, since a retry resumes from the last checkpoint and may well finish.
    Each message names the rank and quotes `TypeName: message`, else torchrun's last stderr line.
    """
    prefix = f"training with {nproc} processes failed (exit {returncode})"
    for report in reports:
        kind = report.get("kind")
        if kind == "collective":
            continue
        message = f"{prefix}: rank {report.get('rank')}: {report.get('type')}: {report.get('message')}"
        cls = getattr(errors, str(report.get("class")), None) if kind == "gptflow" else None
        if isinstance(cls, type) and issubclass(cls, errors.GptflowError):
            return cls(message)
        if kind == "transient":
            return errors.TransientError(message)
        return WorkerError(message)
    if reports:  # only processes that lost a partner reported: the partner was killed or cut off
        first = reports[0]
        lost = f"rank {first.get('rank')}: {first.get('type')}: {first.get('message')}"
        return errors.TransientError(f"{prefix}: a process was lost ({lost})")
    return errors.TransientError(f"{prefix}: {last_line or 'nothing on stderr'}")


def run_torchrun(
    nproc: int,
    module: str,
    args: Sequence[str],
    *,
    on_stdout: Callable[[str], None],
    on_stderr: Callable[[str], None],
) -> None:
    """Run `module` in `nproc` processes under torchrun and wait for them, passing each line they write to
    on_stdout / on_stderr (without its newline). A non-zero exit raises one error (see `launch_failure`),
    built from the reports the processes wrote (report_failure) into a folder made for this launch.

    If this process dies, the pipe closes and rank 0's next write to stdout fails, which ends the launch.
    """
    with tempfile.TemporaryDirectory(prefix="gptflow-torchrun-") as reports:
        returncode, last_line = _run(nproc, module, args, Path(reports), on_stdout, on_stderr)
        if returncode != 0:
            raise launch_failure(nproc, returncode, read_reports(Path(reports)), last_line)


def _run(
    nproc: int,
    module: str,
    args: Sequence[str],
    reports: Path,
    on_stdout: Callable[[str], None],
    on_stderr: Callable[[str], None],
) -> tuple[int, str | None]:
    """torchrun's exit status and the last non-blank line it wrote to stderr."""
    process = subprocess.Popen(
        torchrun_command(nproc, module, args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env=_child_env(nproc, reports),
    )
    last_line: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            line = line.rstrip("\n")
            if line.strip():
                last_line[:] = [line.strip()]
            on_stderr(line)

    reader = threading.Thread(target=read_stderr, name="torchrun-stderr", daemon=True)
    reader.start()
    try:
        for line in process.stdout:
            on_stdout(line.rstrip("\n"))
        returncode = process.wait()
    finally:
        if process.poll() is None:  # this side failed (a callback raised, an interrupt): stop the launch
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=10)
    return returncode, next(iter(last_line), None)
