"""What the Prefect UI shows of a version: its metrics, with listed records (quarantined archives) as a table."""

from storage.store import StageRef, Store
from tasks.artifacts import MAX_LISTED_ROWS, summary_markdown


def test_the_summary_lists_quarantined_archives_as_a_table(tmp_path):
    store = Store(tmp_path)
    rows = [
        {"archive": "owt.tar", "member": f"urlsf_{i}.xz", "reason": "truncated"} for i in range(MAX_LISTED_ROWS + 3)
    ]
    metrics = {"docs": 10, "quarantined_archives": len(rows), "quarantined": rows}
    store.publish("extract", "v1", lambda out: metrics, params={}, inputs={}, code_version="c")
    text = summary_markdown(store, StageRef("extract", "v1"))
    assert f"| quarantined_archives | {len(rows)} |" in text
    assert "| owt.tar | urlsf_0.xz | truncated |" in text
    assert f"urlsf_{MAX_LISTED_ROWS}.xz" not in text and "3 more in the manifest" in text


def test_the_reports_plots_show_in_place_in_the_ui_once_each(tmp_path):
    store = Store(tmp_path)
    png = b"\x89PNG\r\n\x1a\n" + b"plot bytes"

    def build(out):
        (out / "report.md").write_text("# Report\n\n![validation loss](val_loss.png)\n\ntext\n", encoding="utf-8")
        (out / "val_loss.png").write_bytes(png)
        (out / "curves.png").write_bytes(png + b"2")
        return {}

    store.publish("evaluate", "v1", build, params={}, inputs={}, code_version="c")
    text = summary_markdown(store, StageRef("evaluate", "v1"))
    # A relative link is a broken image in the UI: the file's bytes take its place, under the report's title.
    assert "](val_loss.png)" not in text
    assert text.count("data:image/png;base64,") == 2
    assert text.index("![validation loss](data:image/png;base64,") < text.index("text\n")
    assert "![val_loss]" not in text and "![curves](data:image/png;base64," in text
