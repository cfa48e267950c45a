"""Data-parallel training over several processes: joining a torchrun launch, the few collectives the training
loop needs, and launching torchrun from a parent process.

torchrun starts one process per device and tells each its place through the environment (RANK, LOCAL_RANK,
WORLD_SIZE, and MASTER_ADDR/MASTER_PORT for the rendezvous). Outside a launch, or before `process_group`
is entered, everything here describes a single process: world_size() is 1, reductions return their input
and barrier() returns at once, so the training loop calls them unconditionally.
"""

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from storage import errors

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A failing process writes this line to stderr before its traceback, so that its launcher can name the
# root cause in one line: torchrun's own report ends with a banner, and the other processes fail after it
# with "connection closed by peer".
ERROR_MARK = "gptflow-error:"
_MARKED = re.compile(re.escape(ERROR_MARK) + r" (\w+): (.*)")


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


def report_failure(exc: BaseException) -> None:
    """Write the one line a launcher reads to name this process's error (see ERROR_MARK)."""
    reason = (str(exc).splitlines() or [""])[0]
    sys.stderr.write(f"{ERROR_MARK} {type(exc).__name__}: {reason}\n")
    sys.stderr.flush()


# -- launching -----------------------------------------------------------------------------------------


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """One machine, `nproc` processes, a free rendezvous port chosen by torchrun (--standalone); this
    interpreter, so the processes run in the same environment as the caller."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", module, *args]


def _child_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    # The project importable wherever the caller's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    # Share the cores instead of each process taking all of them (torchrun would set 1, with a warning).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _failure(nproc: int, returncode: int, reported: Sequence[str], last_line: str | None) -> Exception:
    """One error naming why the processes failed.

    A process that reported bad configuration or data (ValueError, a gptflow error) names the root cause,
    and its class is kept: a retry cannot fix it. Anything else (a process killed by a signal or out of
    memory, and the "connection closed by peer" its partners then report; a lost rendezvous) is transient:
    a retry resumes from the last checkpoint. The message quotes the first reported error, else torchrun's
    last stderr line.
    """
    prefix = f"training with {nproc} processes failed (exit {returncode})"
    errors_seen = [m.groups() for m in map(_MARKED.search, reported) if m]
    for name, reason in errors_seen:
        cls = getattr(errors, name, None) if name != "ValueError" else ValueError
        if isinstance(cls, type) and issubclass(cls, ValueError | errors.GptflowError):
            return cls(f"{prefix}: {name}: {reason}")
    if errors_seen:
        name, reason = errors_seen[0]
        return errors.TransientError(f"{prefix}: {name}: {reason}")
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
    on_stdout / on_stderr (without its newline). A non-zero exit raises one error (see `_failure`).

    If this process dies, the pipe closes and rank 0's next write to stdout fails, which ends the launch.
    """
    process = subprocess.Popen(
        torchrun_command(nproc, module, args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env=_child_env(nproc),
    )
    reported: list[str] = []  # the processes' ERROR_MARK lines, first failure first
    last_line: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            line = line.rstrip("\n")
            if ERROR_MARK in line:
                reported.append(line)
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
    if returncode != 0:
        raise _failure(nproc, returncode, reported, next(iter(last_line), None))
