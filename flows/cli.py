"""`gptflow`: the command line (contract in DESIGN.md).

    gptflow run [--storage DIR] [--source URL]... [--preset NAME] [--config FILE]
                [--only STAGE | --from STAGE --until STAGE] [--force STAGE]...
    gptflow sample-data DIR
    gptflow storage ls [STAGE] | show VERSION | gc [--keep-runs N] [--dry-run]
    gptflow generate [--model STAGE|VERSION] [--prompt TEXT] ...
    gptflow serve            (the deployments, served from this process for the Prefect UI)

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
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument(
        "--instruction", action="store_true", help="wrap the prompt in the fine-tuning template; print the answer"
    )

    serve = sub.add_parser("serve", help="serve the pipeline and nightly deployments to a Prefect server")
    serve.add_argument("--storage", default=default_storage())
    serve.add_argument("--cron", default="0 2 * * *", help="nightly retraining schedule (cron, UTC)")
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
    record = pipeline(
        storage=args.storage,
        preset=args.preset,
        sources=args.source,
        config=overrides or None,
        selection=selection,
        verify=args.verify,
        dask=args.dask,
    )
    print_run(record)
    return 0


def print_run(record: dict[str, Any]) -> None:
    print(f"\nrun {record['run_id']}  ({record['status']})")
    print(f"{'stage':<10} {'version':<13} status")
    for stage, info in record["stages"].items():
        print(f"{stage:<10} {info['version'] or '-':<13} {info['status']}")
    summary = record.get("summary") or {}
    extract = summary.get("data", {}).get("extract", {})
    if extract.get("quarantined_archives"):
        print(
            f"\nextract: {extract['quarantined_archives']} of {extract.get('inner_archives', '?')} inner archives "
            f"quarantined as corrupt ({extract.get('corrupt_fraction', 0):.2%}); see the extract manifest"
        )
    if "champion" in summary:
        print(f"\nchampion: {summary['champion']}")
    for name in ("pretrain", "finetune", "quantized"):
        if f"{name}_val_loss" in summary:
            print(f"{name:<10} val loss {summary[f'{name}_val_loss']:.4f}")
    if "unigram_val_loss" in summary:
        print(f"{'unigram':<10} val loss {summary['unigram_val_loss']:.4f}  (baseline: token frequencies only)")


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
    from tasks.generate import generate_text

    for text in generate_text(
        args.storage,
        args.model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        num_samples=args.num_samples,
        instruction=args.instruction,
    ):
        print(text)
        print("-" * 40)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve

    serve(args.storage, args.cron)
    return 0


COMMANDS = {
    "run": cmd_run,
    "sample-data": cmd_sample_data,
    "storage": cmd_storage,
    "generate": cmd_generate,
    "serve": cmd_serve,
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
