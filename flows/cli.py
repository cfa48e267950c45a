"""`gptflow`: the command line (contract in DESIGN.md).

    gptflow run [--storage DIR] [--source URL]... [--preset NAME] [--config FILE]
                [--only STAGE | --from STAGE --until STAGE] [--force STAGE]...
    gptflow sample-data DIR
    gptflow storage ls [STAGE] | show VERSION | gc [--keep-runs N] [--dry-run]
    gptflow generate [--model STAGE|VERSION] [--prompt TEXT] ...
    gptflow serve            (the deployments, served from this process for the Prefect UI)
    gptflow server start | stop   (a local Prefect server and worker that run the deployments)
    gptflow export VERSION DIR   (a model version as a Hugging Face GPT-2 folder)
    gptflow models           (the model registry: the champion and every promotion decision)
    gptflow status [--preset NAME] [--config FILE]   (whether a run would reuse each stage, and why not)

Exit codes: 0 success, 1 a stage failed, 2 bad input or usage. Errors are one line on stderr.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from flows.plan import STAGE_ORDER

EXIT_FAILED, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """Options or settings that cannot work together: exit 2 before any work starts."""


def _quiet_prefect_defaults() -> None:
    """Offline-friendly Prefect settings, unless the user set them: no telemetry, a patient ephemeral start."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def default_storage() -> str:
    return os.environ.get("GPTFLOW_STORAGE", "storage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptflow", description="Build a GPT from raw web text, as Prefect flows.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (the embedded default corpus unless --source is given)")
    run.add_argument("--storage", default=default_storage(), help="store root (default: $GPTFLOW_STORAGE or ./storage)")
    run.add_argument("--source", action="append", default=[], help="archive URL or path (repeatable)")
    run.add_argument("--preset", default="tiny", help="tiny (CPU, minutes), small (one GPU), gpt2 (several GPUs)")
    run.add_argument("--config", type=Path, help="YAML or JSON file of settings laid over the preset")
    run.add_argument("--only", choices=STAGE_ORDER, help="run one stage on the latest versions of its inputs")
    run.add_argument("--from", dest="from_stage", choices=STAGE_ORDER, help="start at this stage")
    run.add_argument("--until", choices=STAGE_ORDER, help="stop after this stage")
    run.add_argument("--force", action="append", default=[], choices=STAGE_ORDER, help="recompute this stage")
    run.add_argument(
        "--verify",
        action="store_true",
        help="reuse a stored version only if every file matches its sha256 (reads every byte; without it, names "
        "and sizes are checked)",
    )

    run.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run the data stages' per-shard tasks on the Dask cluster whose scheduler is at ADDRESS "
        "(e.g. tcp://10.0.0.5:8786); its workers need the same store path and Prefect API",
    )

    sample = sub.add_parser("sample-data", help="write the embedded default corpus as an OpenWebText archive")
    sample.add_argument("dir", type=Path)

    store = sub.add_parser("storage", help="inspect or clean the versioned store")
    store.add_argument("--storage", default=default_storage())
    store_sub = store.add_subparsers(dest="action", required=True)
    ls = store_sub.add_parser("ls", help="list stages, or one stage's versions, or (ls runs) the runs")
    ls.add_argument("stage", nargs="?")
    show = store_sub.add_parser("show", help="print one version's manifest (a unique id prefix is enough)")
    show.add_argument("version")
    gc = store_sub.add_parser("gc", help="remove versions no latest pointer or recent run uses")
    gc.add_argument("--keep-runs", type=int, default=5)
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument(
        "--scratch", action="store_true", help="also drop unfinished versions' resume state (partials, checkpoints)"
    )

    gen = sub.add_parser("generate", help="sample text from a model in the store")
    gen.add_argument("--storage", default=default_storage())
    gen.add_argument("--model", default="finetune", help="pretrain, finetune, quantize, or a version id")
    gen.add_argument("--prompt", default="The ")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the tokens holding this mass")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument(
        "--instruction", action="store_true", help="wrap the prompt in the fine-tuning template; print the answer"
    )

    export = sub.add_parser("export", help="write a model version as a Hugging Face GPT-2 folder (transformers)")
    export.add_argument("--storage", default=default_storage())
    export.add_argument(
        "version",
        help="a version id (a unique prefix is enough) of pretrain, finetune or quantize, or a stage name "
        "for its latest version; a quantized model is exported dequantized, as float32",
    )
    export.add_argument("dir", type=Path, help="the folder to create (it must not exist, or be empty)")

    models = sub.add_parser("models", help="the model registry: the champion and every promotion decision")
    models.add_argument("--storage", default=default_storage())

    status = sub.add_parser("status", help="whether a run would reuse each stage's stored version, and why not")
    status.add_argument("--storage", default=default_storage())
    status.add_argument("--preset", default="tiny", help="the settings a run would start from, as for run")
    status.add_argument("--config", type=Path, help="YAML or JSON file of settings laid over the preset")
    status.add_argument("--source", action="append", default=[], help="archive URL or path, as for run")

    serve = sub.add_parser(
        "serve", help="serve the pipeline and nightly deployments from this process (stopping it pauses them)"
    )
    serve.add_argument("--storage", default=default_storage())

    server = sub.add_parser("server", help="a local Prefect server with a worker that runs the deployments")
    server_sub = server.add_subparsers(dest="action", required=True)
    server_start = server_sub.add_parser(
        "start", help="start a Prefect server (SQLite, 127.0.0.1) and a process worker; register the deployments"
    )
    server_start.add_argument(
        "--storage",
        default=default_storage(),
        help="the store the deployments run on; the server's state, logs and SQLite database go to its .server/",
    )
    server_start.add_argument("--port", type=int, help="port of the API and the UI (default: 4200)")
    server_start.add_argument(
        "--auth",
        metavar="USER:PASS",
        help="basic auth the server enforces (default: $PREFECT_SERVER_API_AUTH_STRING, which keeps it out of ps)",
    )
    server_stop = server_sub.add_parser("stop", help="stop the processes `server start` recorded for this store")
    server_stop.add_argument("--storage", default=default_storage())
    for registers_nightly in (serve, server_start):
        registers_nightly.add_argument("--cron", help="nightly retraining schedule (default: 0 2 * * *)")
        registers_nightly.add_argument("--timezone", help="IANA time zone of the schedule (default: UTC)")
        registers_nightly.add_argument(
            "--max-start-delay-hours",
            type=float,
            help="a scheduled nightly run that starts more than this many hours late skips its work (default: 6)",
        )
    return parser


class ConsoleWithoutUserTracebacks(logging.Formatter):
    """Wraps the console's formatter: an error the user caused (bad input or settings, a source that stays
    unreachable) is logged as its one-line message. Only the console is affected: the run's log in Prefect
    keeps the full traceback."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        from storage.errors import GptflowError

        if record.exc_info and isinstance(record.exc_info[1], GptflowError):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


def hide_user_error_tracebacks() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and handler.formatter is not None:
            if not isinstance(handler.formatter, ConsoleWithoutUserTracebacks):
                handler.setFormatter(ConsoleWithoutUserTracebacks(handler.formatter))


def cmd_run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.config import preset_config, read_settings_file
    from flows.pipeline import STAGE_INPUTS, pipeline
    from flows.plan import StageSelection, plan_stages
    from flows.preflight import check_run
    from storage.errors import GptflowError
    from storage.store import Store

    hide_user_error_tracebacks()
    try:  # every mistake in the options is found before any work starts
        selection = StageSelection(only=args.only, from_stage=args.from_stage, until=args.until, force=args.force)
        overrides = read_settings_file(args.config) if args.config else {}
        cfg = preset_config(args.preset, overrides)
        if args.source:
            cfg = cfg.with_sources(args.source)
        check_run(Store(args.storage), plan_stages(selection, STAGE_INPUTS), selection, cfg, args.source, args.verify)
    except (GptflowError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise
        raise UsageError(_one_line(exc)) from exc
    state = pipeline(
        storage=args.storage,
        preset=args.preset,
        sources=args.source,
        config=overrides or None,
        selection=selection,
        verify=args.verify,
        dask=args.dask,
        return_state=True,
    )
    if not state.is_completed():
        from flows.runs import retry_command

        run_id = state.state_details.flow_run_id
        failed = Store(args.storage).read_run(str(run_id))
        if failed is not None:
            print_run(failed)
        print(f"\nto retry this run (its completed stages are cached): {retry_command(run_id)}")
    record = state.result()  # a failed run raises its stage's error here: main() reports it in one line
    print_run(record)
    return 0


def print_run(record: dict[str, Any]) -> None:
    from flows.runs import quarantine_note, stage_rows, val_losses

    print(f"\nrun {record['run_id']}  ({record['status']})")
    print(f"{'stage':<10} {'version':<13} status")
    for stage, version, status in stage_rows(record):
        print(f"{stage:<10} {version or '-':<13} {status}")
    summary = record.get("summary") or {}
    if quarantined := quarantine_note(summary):
        print(f"\n{quarantined}")
    if "champion" in summary:
        print(f"\nchampion: {summary['champion']}")
    for name, loss, note in val_losses(summary):
        print(f"{name:<10} val loss {loss:.4f}" + (f"  ({note})" if note else ""))


def cmd_sample_data(args: argparse.Namespace) -> int:
    from tasks.sample_data import ensure_sample_archive

    path = ensure_sample_archive(args.dir)
    print(path)
    return 0


def cmd_storage(args: argparse.Namespace) -> int:
    from storage.store import Store

    store = Store(args.storage)
    if args.action == "ls" and args.stage == "runs":
        print_runs(store)
    elif args.action == "ls":
        stages = [args.stage] if args.stage else store.stages()
        for stage in stages:
            latest = store.latest(stage)
            for manifest in store.versions(stage):
                mark = "*" if manifest["version"] == latest else " "
                inputs = ",".join(f"{k}={v}" for k, v in manifest["inputs"].items())
                print(f"{mark} {stage:<10} {manifest['version']}  {manifest['created_at'][:19]}  {inputs}")
    elif args.action == "show":
        stage, version = store.find(args.version)
        print(json.dumps(store.manifest(stage, version), indent=2))
    elif args.action == "gc":
        removed = store.gc(keep_runs=args.keep_runs, dry_run=args.dry_run, scratch=args.scratch)
        verb = "would remove" if args.dry_run else "removed"
        for item in removed:
            print(f"{verb} {item}")
        print(f"{verb} {len(removed)} versions")
    return 0


def print_runs(store: Any) -> None:
    """One line per run, oldest first: a run whose process died without a word (SIGKILL) reads `dead`."""
    from storage.store import run_status

    for record in store.runs():
        failed = f"  {record.get('failed_stage')}: {record.get('error')}" if record.get("failed_stage") else ""
        started = str(record.get("started_at", ""))[:19]
        print(f"{record.get('run_id', '?'):<36}  {started}  {run_status(record):<11}{failed}")


def cmd_generate(args: argparse.Namespace) -> int:
    from flows.generate import generate_text

    for text in generate_text(
        args.storage,
        args.model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_samples=args.num_samples,
        instruction=args.instruction,
    ):
        print(text)
        print("-" * 40)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flows.generate import find_tokenizer, load_store_model
    from model.hf import export_hf
    from storage.store import Store

    store = Store(args.storage)
    model, _, ref = load_store_model(store, args.version)
    stage, version = ref.split("/")
    export_hf(model, find_tokenizer(store, stage, version), args.dir)
    dequantized = " (quantized weights dequantized to float32)" if stage == "quantize" else ""
    print(f"exported {ref} to {args.dir}{dequantized}")
    return 0


def nightly_schedule(args: argparse.Namespace) -> Any:
    """The nightly deployment's schedule from `serve` or `server start` options; unset ones keep defaults."""
    from flows.deploy import NightlySchedule

    given = {"cron": args.cron, "timezone": args.timezone, "max_start_delay_hours": args.max_start_delay_hours}
    return NightlySchedule(**{name: value for name, value in given.items() if value is not None})


def cmd_models(args: argparse.Namespace) -> int:
    from storage.registry import CHAMPION, Registry

    registry = Registry(args.storage)
    champion, history = registry.alias(CHAMPION), registry.history()
    if champion is None and not history:
        print(f"no model judged yet in {registry.root}: run the pipeline through evaluate")
        return 0
    if champion is not None:
        print(f"champion  {champion['model']}  (decision {champion['seq']}, {champion['at'][:19]})")
        frozen = registry.frozen_info(champion["frozen_set"]) or {}
        print(
            f"frozen evaluation set {champion['frozen_set']}: {frozen.get('documents', '?')} documents, "
            f"{frozen.get('text_bytes', '?')} bytes, {frozen.get('heldout_pairs', '?')} held-out pairs "
            f"(from tokens/{frozen.get('source', {}).get('tokens', '?')})"
        )
    print(f"\n{'#':>3}  {'at':<19}  {'decision':<8}  {'challenger':<24}  {'against':<24}  {'metric':<32}  reason")
    for line in history:
        metric = line.get("settings", {}).get("metric", "bits_per_byte")
        scores = [(line["metrics"].get(role) or {}).get(metric) for role in ("challenger", "champion")]
        shown = f"{metric} " + " vs ".join("-" if v is None else f"{v:.4f}" for v in scores)
        print(
            f"{line['seq']:>3}  {line['at'][:19]:<19}  {line['decision']:<8}  {line['challenger']:<24}  "
            f"{line['champion'] or '-':<24}  {shown:<32}  {line['reason']}"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flows.config import preset_config, read_settings_file
    from flows.status import pipeline_status, status_table
    from storage.store import Store

    cfg = preset_config(args.preset, read_settings_file(args.config) if args.config else None)
    if args.source:
        cfg = cfg.with_sources(args.source)
    for line in status_table(pipeline_status(Store(args.storage), cfg)):
        print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve

    serve(args.storage, nightly_schedule(args))
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from flows import server

    if args.action == "stop":
        for line in server.stop(args.storage):
            print(line)
        return 0
    given = {"port": args.port, "auth": args.auth}
    settings = server.ServerSettings(**{name: value for name, value in given.items() if value is not None})
    state = server.start(args.storage, settings, nightly_schedule(args), report=print)
    processes = ", ".join(f"{p['name']} pid {p['pid']}" for p in state["processes"])
    print(f"\nPrefect UI  {state['ui_url']}")
    print(f"API         {state['api_url']}  (export PREFECT_API_URL={state['api_url']} for the prefect CLI)")
    if state["auth"]:
        print("auth        on: API clients need PREFECT_API_AUTH_STRING=user:pass")
    print(f"database    {state['database']}")
    print(f"processes   {processes}; logs in {server.state_dir(args.storage)}")
    print(f"stop        gptflow server stop --storage {server.state_dir(args.storage).parent}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "sample-data": cmd_sample_data,
    "storage": cmd_storage,
    "generate": cmd_generate,
    "serve": cmd_serve,
    "server": cmd_server,
    "export": cmd_export,
    "models": cmd_models,
    "status": cmd_status,
}


def main(argv: list[str] | None = None) -> int:
    _quiet_prefect_defaults()
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from storage.errors import GptflowError

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("gptflow: interrupted; completed stages stay in the store", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"gptflow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"gptflow: error: invalid settings: {problems}", file=sys.stderr)
        return EXIT_USAGE
    except (GptflowError, ValueError, OSError) as exc:
        print(f"gptflow: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED if args.command == "run" else EXIT_USAGE
    except Exception as exc:
        if args.command != "run" or os.environ.get("GPTFLOW_DEBUG"):
            raise
        # A stage failed on something unexpected: Prefect's task log holds the traceback.
        print(f"gptflow: error: {type(exc).__name__}: {_one_line(exc)} (traceback in the run's log)", file=sys.stderr)
        return EXIT_FAILED


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
