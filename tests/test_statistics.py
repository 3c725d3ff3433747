"""Each save records its figures in the step metadata and logs one summary line."""

from __future__ import annotations

import json
import logging

import numpy as np

import ckpt_async as ocp


def test_save_statistics_recorded_and_logged(tmp_path, caplog):
    state = {"a": np.ones((256, 256), np.float32), "b": np.arange(10)}
    with caplog.at_level(logging.INFO, logger="ckpt_async"), \
            ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(5, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        perf = mngr.metadata(5).performance_metrics
    assert perf["bytes"] == 256 * 256 * 4 + 10 * 8
    assert perf["arrays"] == 2
    assert 0 < perf["blocking_secs"] == perf["checkpointer_blocking_duration_secs"]
    assert perf["write_secs"] > 0 and perf["write_bytes_per_sec"] > 0
    lines = [r.getMessage() for r in caplog.records if "committed" in r.getMessage()]
    assert len(lines) == 1 and f"{tmp_path}/5" in lines[0] and "2 arrays" in lines[0]
    # Orbax's performance_metrics holds only the float fields it knows (it rejects others).
    doc = json.loads((tmp_path / "5" / "_CHECKPOINT_METADATA").read_text())
    assert set(doc["performance_metrics"]) == {"checkpointer_blocking_duration_secs",
                                               "wait_for_prev_duration_secs"}
    assert set(doc) == {"item_handlers", "metrics", "performance_metrics", "init_timestamp_nsecs",
                        "commit_timestamp_nsecs", "custom_metadata"}  # Orbax's keys only
    ext = json.loads((tmp_path / "5" / "_CKPT_ASYNC").read_text())
    assert ext["statistics"]["bytes"] == perf["bytes"]


def test_progress_reports_bytes_written_and_read(tmp_path):
    state = {f"a{i}": np.full((1 << 18,), i, np.float32) for i in range(40)}  # 40 MiB
    total = sum(a.nbytes for a in state.values())
    events: list[ocp.ProgressEvent] = []
    with ocp.progress(events.append), ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        mngr.restore(1)
    saves = [e for e in events if e.kind == "save"]
    restores = [e for e in events if e.kind == "restore"]
    assert len(saves) >= 2  # batches, not one event at the end
    assert [e.done_bytes for e in saves] == sorted(e.done_bytes for e in saves)
    assert saves[-1].done_bytes == saves[-1].total_bytes == total
    assert len(restores) == 40 and restores[-1].done_bytes == total
    events.clear()
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.restore(1)
    assert events == []  # the listener is gone after the block
