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
