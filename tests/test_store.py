"""The versioned store: version ids, atomic publish (also under a killed writer), manifests, locks, gc."""

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import storage.store
from storage.errors import StoreError, TransientError
from storage.store import Store, sha256_file, version_id


def write_files(files: dict[str, bytes]):
    def build(out: Path) -> dict:
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        return {"files_written": len(files)}

    return build


def publish(store: Store, stage: str, version: str, files: dict[str, bytes], inputs=None, **kw) -> bool:
    return store.publish(
        stage, version, write_files(files), params={"p": 1}, inputs=inputs or {}, code_version="c0", **kw
    )


def test_version_id_depends_on_every_ingredient():
    base = version_id("clean", "code1", {"min_words": 50}, {"extract": "abc"})
    assert base == version_id("clean", "code1", {"min_words": 50}, {"extract": "abc"})
    assert len(base) == 12
    others = {
        version_id("dedup", "code1", {"min_words": 50}, {"extract": "abc"}),
        version_id("clean", "code2", {"min_words": 50}, {"extract": "abc"}),
        version_id("clean", "code1", {"min_words": 51}, {"extract": "abc"}),
        version_id("clean", "code1", {"min_words": 50}, {"extract": "abd"}),
        version_id("clean", "code1", {"min_words": 50}, {"extract": "abc"}, identity={"etag": "x"}),
    }
    assert base not in others and len(others) == 5
    # Key order of the parameters is irrelevant.
    assert version_id("s", "c", {"a": 1, "b": 2}, {}) == version_id("s", "c", {"b": 2, "a": 1}, {})


def test_publish_writes_manifest_files_and_latest(tmp_path):
    store = Store(tmp_path)
    assert publish(store, "extract", "v1", {"docs/a.parquet": b"abc", "x.txt": b"hello"})
    manifest = store.manifest("extract", "v1")
    assert {"stage", "version", "created_at", "params", "inputs", "code_version", "files", "metrics", "prefect"} <= set(
        manifest
    )
    assert manifest["files"]["docs/a.parquet"]["bytes"] == 3
    assert manifest["files"]["x.txt"]["sha256"] == sha256_file(tmp_path / "extract" / "v1" / "x.txt")
    assert manifest["metrics"] == {"files_written": 2}
    assert store.latest("extract") == "v1"
    assert [m["version"] for m in store.versions("extract")] == ["v1"]
    # Nothing temporary is left beside the version.
    assert sorted(p.name for p in (tmp_path / "extract").iterdir()) == [".locks", "latest", "v1"]


def test_publish_is_idempotent_and_replace_rebuilds(tmp_path):
    store = Store(tmp_path)
    assert publish(store, "s", "v1", {"a": b"1"})
    assert not publish(store, "s", "v1", {"a": b"2"})
    assert (tmp_path / "s" / "v1" / "a").read_bytes() == b"1"
    assert publish(store, "s", "v1", {"a": b"2"}, replace=True)
    assert (tmp_path / "s" / "v1" / "a").read_bytes() == b"2"
    assert store.manifest("s", "v1")["files"]["a"]["bytes"] == 1


def test_failed_build_leaves_nothing_and_keeps_older_versions(tmp_path):
    store = Store(tmp_path)
    publish(store, "s", "good", {"a": b"1"})

    def broken(out: Path) -> dict:
        (out / "half").write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        store.publish("s", "bad", broken, params={}, inputs={}, code_version="c")
    assert not store.has("s", "bad")
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "s").iterdir())
    assert store.latest("s") == "good"


def test_missing_input_is_refused(tmp_path):
    with pytest.raises(StoreError, match="extract/nope"):
        publish(Store(tmp_path), "clean", "v1", {"a": b""}, inputs={"extract": "nope"})


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from storage.store import Store

    def build(out: Path) -> dict:
        (out / "part-1").write_bytes(b"x" * 1000)
        Path(sys.argv[2]).write_text("halfway")
        time.sleep(60)  # killed here
        (out / "part-2").write_bytes(b"y")
        return {}

    Store(sys.argv[1]).publish("s", "v1", build, params={}, inputs={}, code_version="c")
    """
)


def test_killed_writer_leaves_no_partial_version_and_a_rerun_completes(tmp_path):
    store_dir, marker = tmp_path / "store", tmp_path / "halfway"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store_dir), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never got halfway"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    store = Store(store_dir)
    assert not store.has("s", "v1")
    assert not (store_dir / "s" / "v1").exists()
    assert store.latest("s") is None
    # The kernel released the dead writer's lock: a rerun publishes the whole version and sweeps the leftover.
    assert publish(store, "s", "v1", {"part-1": b"x", "part-2": b"y"})
    assert sorted(store.manifest("s", "v1")["files"]) == ["part-1", "part-2"]
    assert not any(p.name.startswith(".tmp") for p in (store_dir / "s").iterdir())


def _hold_lock(root: str, started, release) -> None:
    with Store(root).lock("s", "v1"):
        started.set()
        release.wait(30)


def test_lock_serialises_writers_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), started, release))
    holder.start()
    try:
        assert started.wait(60)
        with pytest.raises(TransientError, match="being built by another run"):
            with Store(tmp_path).lock("s", "v1", timeout=0.3):
                pass
        release.set()
        holder.join(30)
        with Store(tmp_path).lock("s", "v1", timeout=5):
            pass
    finally:
        release.set()
        holder.join(5)
        if holder.is_alive():
            holder.kill()


def _hold_lock_as_run(root: str, run_id: str, started, release) -> None:
    with Store(root).lock("s", "v1", owner={"run_id": run_id}):
        started.set()
        release.wait(30)


def test_a_build_waiting_for_another_runs_lock_says_whom_it_waits_for(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(storage.store, "LOCK_REPORT_SECONDS", 0.3)
    ctx = multiprocessing.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock_as_run, args=(str(tmp_path), "run-A", started, release))
    holder.start()
    lock_file = tmp_path / "s" / ".locks" / "v1.lock"
    seen_inside = {}

    def build(out: Path) -> dict:
        seen_inside.update(json.loads(lock_file.read_text()))  # what a run waiting for this one would read
        return {}

    try:
        assert started.wait(60)
        with pytest.raises(TransientError, match=f"being built by another run \\(run run-A \\(pid {holder.pid} "):
            with Store(tmp_path).lock("s", "v1", timeout=0.3):
                pass
        timer = threading.Timer(1.5, release.set)
        timer.start()
        with caplog.at_level(logging.INFO, logger="gptflow.test"):
            built = Store(tmp_path).publish(
                "s",
                "v1",
                build,
                params={},
                inputs={},
                code_version="c0",
                prefect={"flow_run_id": "run-B"},
                log=logging.getLogger("gptflow.test"),
            )
        timer.join()
    finally:
        release.set()
        holder.join(30)
        if holder.is_alive():
            holder.kill()
    assert built
    waits = [r.getMessage() for r in caplog.records if r.name == "gptflow.test" and "waiting for" in r.getMessage()]
    # At once, then every LOCK_REPORT_SECONDS, each naming the version and its holder as the lock file records it.
    assert len(waits) >= 3
    assert all(f"waiting for s/v1: run run-A (pid {holder.pid} on {socket.gethostname()})" in m for m in waits)
    assert "waited" in waits[-1]
    assert seen_inside["run_id"] == "run-B" and seen_inside["pid"] == os.getpid()


def test_latest_ignores_a_pointer_to_a_missing_version(tmp_path):
    store = Store(tmp_path)
    publish(store, "s", "v1", {"a": b"1"})
    (tmp_path / "s" / "latest").write_text("gone\n")
    assert store.latest("s") is None
    with pytest.raises(StoreError, match="no complete version of stage 's'"):
        store.require_latest("s")


def test_runs_find_and_gc_keep_lineage(tmp_path):
    store = Store(tmp_path)
    publish(store, "a", "old", {"f": b"0"})
    publish(store, "a", "a1", {"f": b"1"})
    publish(store, "b", "b1", {"f": b"2"}, inputs={"a": "a1"})
    publish(store, "b", "b2", {"f": b"3"}, inputs={"a": "old"})
    store.set_latest("b", "b1")
    store.write_run("r1", {"started_at": "2026-01-01", "stages": {"a": {"version": "a1"}, "b": {"version": "b1"}}})
    assert json.loads((tmp_path / "runs" / "r1.json").read_text())["stages"]["b"]["version"] == "b1"
    assert store.find("b2") == ("b", "b2")
    with pytest.raises(StoreError):
        store.find("zzz")
    assert sorted(store.gc(keep_runs=1, dry_run=True)) == ["a/old", "b/b2"]
    assert store.has("b", "b2")
    assert sorted(store.gc(keep_runs=1)) == ["a/old", "b/b2"]
    assert not store.has("a", "old") and not store.has("b", "b2")
    assert store.has("a", "a1") and store.has("b", "b1")


@pytest.mark.parametrize("bad", ["", "../x", ".hidden", "a/b"])
def test_bad_names_are_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        Store(tmp_path).path(bad or "s", bad)


def test_a_crash_between_the_two_renames_of_a_forced_rebuild_is_undone(tmp_path):
    store = Store(tmp_path)
    publish(store, "s", "v1", {"a": b"old"})
    # The first rename of a forced rebuild happened, the second did not: no version in place.
    os.rename(tmp_path / "s" / "v1", tmp_path / "s" / ".trash-v1-0badf00d")
    assert not store.has("s", "v1")
    assert not publish(store, "s", "v1", {"a": b"new"})  # the old version is back, so nothing is rebuilt
    assert (tmp_path / "s" / "v1" / "a").read_bytes() == b"old"
    os.rename(tmp_path / "s" / "v1", tmp_path / "s" / ".trash-v1-0badf00d")
    store.gc()
    assert (tmp_path / "s" / "v1" / "a").read_bytes() == b"old"  # gc puts it back rather than deleting it
    assert not list((tmp_path / "s").glob(".trash-*"))


def test_gc_keeps_what_a_live_run_uses_and_forgets_dead_runs(tmp_path):
    store = Store(tmp_path)
    publish(store, "a", "in-use", {"f": b"1"})
    publish(store, "a", "newer", {"f": b"2"})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    base = {"started_at": "2026-01-02", "status": "running", "host": socket.gethostname()}
    store.write_run("live", {**base, "pid": os.getpid(), "stages": {"a": {"version": "in-use"}}})
    store.write_run("old", {"started_at": "2026-01-01", "status": "completed", "stages": {}})
    store.write_run("newest", {"started_at": "2026-01-03", "status": "completed", "stages": {}})
    assert store.gc(keep_runs=1) == []  # "in-use" is neither latest nor in the newest run, but a live run uses it
    store.write_run("live", {**base, "pid": int(dead.stdout), "stages": {"a": {"version": "in-use"}}})
    assert store.gc(keep_runs=1) == ["a/in-use"]


def test_gc_clears_scratch_of_complete_versions_and_of_others_only_when_asked(tmp_path):
    store = Store(tmp_path)
    publish(store, "s", "done", {"f": b"1"})
    (store.work_dir("s", "done") / "left.partial").write_bytes(b"x")
    (store.work_dir("s", "unfinished") / "checkpoint.pt").write_bytes(b"x")
    store.gc()
    assert not (tmp_path / "s" / ".work" / "done").exists()
    assert (tmp_path / "s" / ".work" / "unfinished" / "checkpoint.pt").exists()  # resume state stays
    with store.lock("s", "unfinished"):
        store.gc(scratch=True)  # a build holds it: untouched
        assert (tmp_path / "s" / ".work" / "unfinished").exists()
    store.gc(scratch=True)
    assert not (tmp_path / "s" / ".work" / "unfinished").exists()


def test_lock_files_do_not_pile_up(tmp_path):
    store = Store(tmp_path)
    for n in range(5):
        publish(store, "s", f"v{n}", {"a": str(n).encode()})
    with store.lock("s", "v9"):
        assert [p.name for p in (tmp_path / "s" / ".locks").iterdir()] == ["v9.lock"]
    assert list((tmp_path / "s" / ".locks").iterdir()) == []


def _count_holders(root: str, inside, overlaps, n: int) -> None:
    store = Store(root)
    for _ in range(n):
        with store.lock("s", "v1"):
            with inside.get_lock():
                inside.value += 1
                if inside.value > 1:
                    overlaps.value += 1
            time.sleep(0.002)
            with inside.get_lock():
                inside.value -= 1


def test_removing_lock_files_keeps_one_holder_at_a_time(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    inside, overlaps = ctx.Value("i", 0), ctx.Value("i", 0)
    workers = [ctx.Process(target=_count_holders, args=(str(tmp_path), inside, overlaps, 60)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert overlaps.value == 0


def test_damage_names_what_is_wrong_and_verify_reads_the_bytes(tmp_path):
    store = Store(tmp_path)
    publish(store, "s", "v1", {"a": b"12345", "docs/b": b"x"})
    folder = tmp_path / "s" / "v1"
    assert store.damage("s", "v1") is None and store.damage("s", "v1", verify=True) is None
    (folder / "a").write_bytes(b"12399")  # same size, other bytes
    assert store.damage("s", "v1") is None
    assert store.damage("s", "v1", verify=True) == "a does not match its sha256"
    (folder / "a").write_bytes(b"123")
    assert store.damage("s", "v1") == "a has 3 bytes, the manifest lists 5"
    (folder / "docs" / "b").unlink()
    assert store.damage("s", "v1") == "a has 3 bytes, the manifest lists 5"
    (folder / "a").write_bytes(b"12345")
    assert store.damage("s", "v1") == "docs/b is missing"
    (folder / "manifest.json").write_text("{not json")
    assert "manifest.json is unreadable" in store.damage("s", "v1")
    # publish does not take a damaged version for a complete one
    assert publish(store, "s", "v1", {"a": b"fresh"})
    assert store.damage("s", "v1", verify=True) is None


def test_a_run_killed_with_sigkill_is_shown_dead(tmp_path):
    from storage.store import process_started, run_status

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"status": "running", "host": socket.gethostname(), "pid": child.pid}
        record["pid_started"] = process_started(child.pid)
        assert run_status(record) == "running"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert run_status(record) == "dead"
        # The same pid taken by another process later (another start time) is no proof of life either.
        assert run_status({**record, "pid": os.getpid()}) == "dead"
        assert run_status({**record, "status": "completed"}) == "completed"
        assert run_status({**record, "host": "another-host"}) == "running"  # cannot tell from here
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device", "/store/s/.tmp-v1/docs/a.parquet"),
        RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file"),
        OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),  # pyarrow's wording
    ],
    ids=["errno", "wrapped", "words"],
)
def test_a_full_disk_however_a_library_reports_it_is_one_disk_full_error(tmp_path, error):
    from storage.errors import DiskFullError

    def build(out: Path) -> dict:
        (out / "part").write_bytes(b"x" * 100)
        if isinstance(error, RuntimeError):  # torch wraps the OSError it met
            try:
                raise OSError(28, "No space left on device")
            except OSError as cause:
                raise error from cause
        raise error

    store = Store(tmp_path)
    with pytest.raises(DiskFullError, match=r"s/v1: no space left on the device writing .*100 bytes of the version"):
        store.publish("s", "v1", build, params={}, inputs={}, code_version="c")
    assert not store.has("s", "v1") and [p.name for p in (tmp_path / "s").iterdir()] == [".locks"]
    assert list((tmp_path / "s" / ".locks").iterdir()) == []
