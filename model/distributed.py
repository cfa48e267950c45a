"""Data-parallel training over several processes: joining a torchrun launch, the few collectives the training
loop needs, and launching torchrun from a parent process, on one machine or on several.

torchrun starts one process per device and tells each its place through the environment (RANK, LOCAL_RANK,
WORLD_SIZE, and MASTER_ADDR/MASTER_PORT for the rendezvous). Outside a launch, or before `process_group`
is entered, everything here describes a single process: world_size() is 1, reductions return their input
and barrier() returns at once, so the training loop calls them unconditionally.

Several machines (nodes) meet at a c10d rendezvous (`Rendezvous`): one torchrun per node, all naming the
same HOST:PORT and id. torchrun numbers the nodes by host name (then process id), so the node whose
launcher waits for the result (the lead) could get any rank; `process_group` renumbers the processes so
that the lead's come first and rank 0, which logs and writes the outputs, runs where its lines are read.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
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
# Set by a multi-node launcher for its processes: "1" on the lead node, "0" on the nodes that join it.
LEAD_ENV = "GPTFLOW_LEAD_NODE"
# How long a node's launcher waits for all the nodes to join: torchrun's own default join_timeout (600 s,
# torch.distributed.elastic.rendezvous.dynamic_rendezvous).
RDZV_TIMEOUT_S = 600
# How long a process of a multi-node launch waits for the lead's processes to announce their node: they
# start at the same moment, once the rendezvous is complete, so only a slow import delays them.
_LEAD_WAIT = timedelta(seconds=120)


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


def lead_first_rank(lead: int, node: int, local_rank: int, nprocs: Sequence[int]) -> int:
    """The rank of process `local_rank` of node `node` (torchrun's GROUP_RANK) when the nodes are counted
    from the lead's: the lead's processes first, then each node after it in torchrun's order (wrapping
    round), `nprocs[n]` processes on node n."""
    order = [(lead + i) % len(nprocs) for i in range(len(nprocs))]
    return sum(nprocs[n] for n in order[: order.index(node)]) + local_rank


def _lead_first(launch: Launch, environ: Mapping[str, str]) -> Launch:
    """This process's place with the lead node's processes first (see the module docstring): the nodes tell
    each other their process counts, and the lead its node number, through torchrun's store. A single node,
    or a launch no gptflow launcher marked, keeps torchrun's numbering."""
    if LEAD_ENV not in environ or int(environ.get("GROUP_WORLD_SIZE", "1")) < 2:
        return launch
    nodes, node = int(environ["GROUP_WORLD_SIZE"]), int(environ["GROUP_RANK"])
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), is_master=False, timeout=_LEAD_WAIT)
    prefix = f"gptflow/{environ.get('TORCHELASTIC_RUN_ID', '')}/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if launch.local_rank == 0:
        store.set(f"{prefix}/nproc/{node}", environ["LOCAL_WORLD_SIZE"])
        if environ[LEAD_ENV] == "1":
            store.set(f"{prefix}/lead", str(node))
    try:
        lead = int(store.get(f"{prefix}/lead"))
    except dist.DistStoreError:
        raise errors.ConfigError(
            f"no lead node announced itself within {_LEAD_WAIT.seconds} s: every node of a {nodes}-node launch "
            "but the one that runs the pretrain stage joins it with `python -m model.train_entry --join`"
        ) from None
    nprocs = [int(store.get(f"{prefix}/nproc/{n}")) for n in range(nodes)]
    return Launch(lead_first_rank(lead, node, launch.local_rank, nprocs), launch.local_rank, launch.world_size)


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join the torchrun launch's process group for the life of the block; yield the device to train on.

    NCCL on CUDA, each process on the GPU numbered by its LOCAL_RANK; gloo on the CPU. Without a launch the
    block runs as a single process on `device`. The group is destroyed on the way out, error or not. In a
    multi-node launch the lead node's processes take ranks 0, 1, ... (see the module docstring).
    """
    launch = launch_from_env()
    if launch is None:
        yield device
        return
    launch = _lead_first(launch, os.environ)
    os.environ["RANK"] = str(launch.rank)  # what report_failure (and anything reading RANK) sees from now on
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


def node_count() -> int:
    """The machines of this launch (torchrun's GROUP_WORLD_SIZE; 1 outside a launch)."""
    return int(os.environ.get("GROUP_WORLD_SIZE", "1")) if is_initialized() else 1


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
    first line, how a single process would classify it (`kind`), the host it ran on and when it was raised.
    Written (atomically) before the process exits; nothing when no launcher named a folder (torchrun started
    by hand). A multi-node launch names a folder on the shared filesystem, so the lead sees every node's.

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
    report["host"] = socket.gethostname()
    report["time"] = time.time()  # one machine's clock; on several, ordered as far as their clocks agree
    path = Path(folder) / f"rank-{process}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(report) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:  # the traceback still reaches stderr; the launcher then sees no report
        sys.stderr.write(f"could not write the failure report {path}: {error}\n")


# -- launching -----------------------------------------------------------------------------------------


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST:PORT of a rendezvous (an IPv6 host in brackets), or a one-line ConfigError naming it."""
    host, colon, port = endpoint.rpartition(":")
    if not colon or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise errors.ConfigError(f"rdzv_endpoint {endpoint!r}: expected HOST:PORT with a port in 1..65535")
    return host, int(port)


@dataclass(frozen=True)
class Rendezvous:
    """Where and how long the nodes of a multi-node launch meet (torchrun's c10d rendezvous).

    The node whose address `endpoint` names hosts the rendezvous store; every node's launcher names the same
    endpoint, node count and `run_id`, and gives up after `timeout_s` seconds without all of them.
    """

    nnodes: int
    endpoint: str  # HOST:PORT, reachable from every node
    run_id: str
    timeout_s: int = RDZV_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.nnodes < 2:
            raise errors.ConfigError(f"nnodes={self.nnodes}: a rendezvous is for 2 or more nodes")
        parse_endpoint(self.endpoint)
        if self.timeout_s < 1:
            raise errors.ConfigError(f"rendezvous timeout {self.timeout_s} s: must be at least 1 s")

    def torchrun_args(self) -> list[str]:
        return [
            f"--nnodes={self.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf=join_timeout={self.timeout_s}",  # torchrun reads it as whole seconds
        ]

    def timed_out(self) -> errors.TransientError:
        """A retry may find every node there (one started late, or its join command was run again)."""
        return errors.TransientError(
            f"rendezvous at {self.endpoint} (id {self.run_id}) timed out after {self.timeout_s} s: not all "
            f"{self.nnodes} nodes joined (each other node runs the join command the lead node logs)"
        )


def torchrun_command(nproc: int, module: str, args: Sequence[str], rendezvous: Rendezvous | None = None) -> list[str]:
    """`nproc` processes on this machine, this interpreter (so they run in the caller's environment). One
    machine: a free rendezvous port chosen by torchrun (--standalone); several: `rendezvous`."""
    place = ["--standalone"] if rendezvous is None else rendezvous.torchrun_args()
    launcher = [sys.executable, "-m", "torch.distributed.run", *place, f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", module, *args]


def _child_env(nproc: int, reports: Path, lead: bool | None) -> dict[str, str]:
    env = dict(os.environ)
    env[REPORTS_ENV] = str(reports)
    if lead is not None:
        env[LEAD_ENV] = "1" if lead else "0"
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


def launch_failure(
    nproc: int, returncode: int, reports: Sequence[dict[str, Any]], last_line: str | None, nnodes: int = 1
) -> Exception:
    """The one error a failed launch raises: the first process's error that is not a failed collective,
    classified as in one process (tasks/stage.py `is_transient`).

    - a gptflow error: the same class (DataIntegrityError, ConfigError, TransientError, ...);
    - a ConnectionError or TimeoutError: TransientError;
    - any other error (KeyError, ValueError, a CUDA out-of-memory RuntimeError): WorkerError, not retried.

    With no such report, the processes were killed (by a signal, the out-of-memory killer) or lost a peer or
    the rendezvous: TransientError, since a retry resumes from the last checkpoint and may well finish.
    Each message names the rank (and with several nodes its host) and quotes `TypeName: message`, else
    torchrun's last stderr line.
    """
    if nnodes == 1:
        prefix = f"training with {nproc} processes failed (exit {returncode})"
    else:
        each = f"{nproc} process{'es' if nproc > 1 else ''} on each of {nnodes} nodes"
        prefix = f"training with {each} failed (exit {returncode})"

    def where(report: dict[str, Any]) -> str:
        return f"rank {report.get('rank')}" + (f" on {report.get('host')}" if nnodes > 1 else "")

    for report in reports:
        kind = report.get("kind")
        if kind == "collective":
            continue
        message = f"{prefix}: {where(report)}: {report.get('type')}: {report.get('message')}"
        cls = getattr(errors, str(report.get("class")), None) if kind == "gptflow" else None
        if isinstance(cls, type) and issubclass(cls, errors.GptflowError):
            return cls(message)
        if kind == "transient":
            return errors.TransientError(message)
        return WorkerError(message)
    if reports:  # only processes that lost a partner reported: the partner was killed or cut off
        first = reports[0]
        lost = f"{where(first)}: {first.get('type')}: {first.get('message')}"
        return errors.TransientError(f"{prefix}: a process was lost ({lost})")
    return errors.TransientError(f"{prefix}: {last_line or 'nothing on stderr'}")


def run_torchrun(
    nproc: int,
    module: str,
    args: Sequence[str],
    *,
    on_stdout: Callable[[str], None],
    on_stderr: Callable[[str], None],
    rendezvous: Rendezvous | None = None,
    lead: bool = True,
    reports: Path | None = None,
) -> None:
    """Run `module` in `nproc` processes under torchrun and wait for them, passing each line they write to
    on_stdout / on_stderr (without its newline). A non-zero exit raises one error (see `launch_failure`),
    built from the reports the processes wrote (report_failure) into `reports`, by default a folder made for
    this launch.

    With a `rendezvous`, these are this machine's processes of a multi-node launch: `lead` says whether this
    is the node whose processes take the first ranks, and `reports` must be a folder every node sees. A
    rendezvous that times out raises Rendezvous.timed_out's error.

    If this process dies, the pipe closes and rank 0's next write to stdout fails, which ends the launch.
    """
    own = tempfile.TemporaryDirectory(prefix="gptflow-torchrun-") if reports is None else nullcontext(reports)
    with own as folder:
        folder = Path(folder)
        command = torchrun_command(nproc, module, args, rendezvous)
        env = _child_env(nproc, folder, None if rendezvous is None else lead)
        returncode, last_line, rendezvous_timed_out = _run(command, env, on_stdout, on_stderr)
        if returncode != 0:
            found = read_reports(folder)
            if rendezvous is not None and rendezvous_timed_out and not found:
                raise rendezvous.timed_out()
            raise launch_failure(nproc, returncode, found, last_line, 1 if rendezvous is None else rendezvous.nnodes)


def _run(
    command: list[str],
    env: dict[str, str],
    on_stdout: Callable[[str], None],
    on_stderr: Callable[[str], None],
) -> tuple[int, str | None, bool]:
    """torchrun's exit status, the last non-blank line it wrote to stderr, and whether it gave up waiting
    for the nodes of a rendezvous."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    last_line: list[str] = []
    timed_out: list[bool] = []

    def read_stderr() -> None:
        for line in process.stderr:
            line = line.rstrip("\n")
            if line.strip():
                last_line[:] = [line.strip()]
            if "RendezvousTimeoutError" in line:  # the class torchrun's traceback ends with
                timed_out[:] = [True]
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
    return returncode, next(iter(last_line), None), bool(timed_out)
