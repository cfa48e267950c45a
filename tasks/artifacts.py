"""What a stage shows in the Prefect UI: a progress bar while it runs and, once published, a summary of
its version (metrics, lineage, and its report and plots where it has them).

Artifacts are for people watching; a failure to create one is logged and never fails the stage.
"""

import base64
import logging
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from storage.store import StageRef, Store

# PNGs are embedded as data URIs and stored in Prefect's database: keep each one small.
MAX_EMBEDDED_PNG_BYTES = 300_000


class ProgressArtifact:
    """A progress artifact per stage run, created on the first update and moved in whole-percent steps."""

    def __init__(self, stage: str, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.stage = stage
        self.log = log
        self.artifact_id: Any = None
        self.percent = -1.0
        self.broken = False

    def __call__(self, fraction: float) -> None:
        percent = float(round(100 * min(max(fraction, 0.0), 1.0)))
        if self.broken or percent <= self.percent:
            return
        self.percent = percent
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    progress=percent, key=f"{self.stage}-progress", description=f"{self.stage}: fraction done"
                )
            else:
                update_progress_artifact(self.artifact_id, progress=percent)
        except Exception as exc:  # the UI is a view: a server hiccup must not stop training
            self.broken = True
            self.log.warning("progress artifact for %s not updated: %s", self.stage, exc)


def _scalar_rows(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_scalar_rows(value, f"{name}."))
        elif isinstance(value, bool | int | str) or value is None:
            rows.append((name, value))
        elif isinstance(value, float):
            rows.append((name, f"{value:.6g}"))
    return rows


# Rows of a listed metric (quarantined archives, say) shown in the UI; the manifest holds them all.
MAX_LISTED_ROWS = 20


def _listed_tables(metrics: dict[str, Any]) -> list[str]:
    """Metrics that are lists of records (the quarantined inner archives, say) as tables of their rows."""
    lines: list[str] = []
    for key, value in metrics.items():
        if not (isinstance(value, list) and value and all(isinstance(row, dict) for row in value)):
            continue
        columns = list(dict.fromkeys(column for row in value for column in row))
        lines += ["", f"**{key}** ({len(value)})", "", "| " + " | ".join(columns) + " |"]
        lines.append("|" + "---|" * len(columns))
        for row in value[:MAX_LISTED_ROWS]:
            cells = (str(row.get(column, "")).replace("|", "\\|").replace("\n", " ") for column in columns)
            lines.append("| " + " | ".join(cells) + " |")
        if len(value) > MAX_LISTED_ROWS:
            lines.append(f"\n{len(value) - MAX_LISTED_ROWS} more in the manifest")
    return lines


def summary_markdown(store: Store, ref: StageRef) -> str:
    manifest = store.manifest(ref.stage, ref.version)
    folder = store.path(ref.stage, ref.version)
    inputs = ", ".join(f"`{stage}/{version}`" for stage, version in manifest["inputs"].items()) or "none"
    total = sum(info["bytes"] for info in manifest["files"].values())
    lines = [
        f"# {ref.stage} `{ref.version}`",
        "",
        f"- inputs: {inputs}",
        f"- code version: `{manifest['code_version']}`",
        f"- files: {len(manifest['files'])} ({total:,} bytes) in `{folder}`",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in _scalar_rows(manifest["metrics"])),
        *_listed_tables(manifest["metrics"]),
    ]
    inlined: set[str] = set()

    def inline(match: re.Match[str]) -> str:
        # report.md links its plots by file name, which the UI cannot follow: the image itself goes in.
        png = folder / match.group(2)
        if not png.is_file() or png.stat().st_size > MAX_EMBEDDED_PNG_BYTES:
            return match.group(0)
        inlined.add(png.name)
        return f"![{match.group(1)}]({_data_uri(png)})"

    report = folder / "report.md"
    if report.is_file():
        lines += ["", _PNG_LINK.sub(inline, report.read_text(encoding="utf-8"))]
    for png in sorted(folder.glob("*.png")):
        if png.name not in inlined and png.stat().st_size <= MAX_EMBEDDED_PNG_BYTES:
            lines += ["", f"![{png.stem}]({_data_uri(png)})"]
    return "\n".join(lines) + "\n"


_PNG_LINK = re.compile(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)")  # a markdown image of a file beside the report


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def publish_summary(store: Store, ref: StageRef, log: logging.Logger | logging.LoggerAdapter) -> None:
    """A markdown artifact keyed by stage: the UI keeps every version of it, newest first."""
    try:
        markdown = summary_markdown(store, ref)
    except Exception as exc:  # the UI is a view: the version is published whatever happens here
        log.warning("summary artifact for %s/%s not created: %s", ref.stage, ref.version, exc)
        return
    publish_markdown(
        f"{ref.stage}-version", markdown, f"{ref.stage}/{ref.version}: metrics, lineage, report and plots", log
    )


def publish_markdown(key: str, markdown: str, description: str, log: logging.Logger | logging.LoggerAdapter) -> None:
    """A markdown artifact under `key` (lowercase letters, digits, dashes), logged instead when the server
    cannot take it: artifacts are for people watching, and never fail what they describe."""
    try:
        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as exc:
        log.warning("artifact %s not created: %s", key, exc)
