"""CheckpointManager side by side with Orbax 0.12.8 on seeded randomized sequences.

After every call, what ``save()``, ``should_save()``, ``all_steps()``, ``latest_step()`` and
``best_step()`` answer must match Orbax's answers, through the sync face and the async face
(where commits are still in flight when the listing is read), and again after both managers
reopen their directories. Orbax loses the metrics of a step unless ``best_fn`` is set (ckpt_async
keeps them), so a ``BestN`` preservation policy without ``best_fn`` is not compared after reopen;
``test_manager.py`` tests that improvement.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest
from _timeout import in_thread

import ckpt_async as ca
import ckpt_async._commit as ca_commit
import ckpt_async.aio


def _loss(m):
    return m["loss"]


def random_config(rng: random.Random) -> tuple[dict, dict, bool]:
    """Options for ckpt_async and for Orbax (policy objects of each library), and whether
    the reopened managers are comparable."""
    opts: dict = {}
    lib_opts = {"ca": {}, "orbax": {}}
    comparable_after_reopen = True
    kind = rng.choice(["legacy", "legacy", "legacy", "policies"])
    if kind == "legacy":
        if rng.random() < 0.6:
            opts["save_interval_steps"] = rng.choice([1, 2, 3])
        if rng.random() < 0.3:
            opts["save_on_steps"] = sorted(rng.sample(range(40), 6))
        if rng.random() < 0.15:
            opts = {"should_save_fn": lambda step, last: step % 3 == 0 or last is None}
        if rng.random() < 0.7:
            opts["max_to_keep"] = rng.choice([1, 2, 3])
        if rng.random() < 0.3:
            opts["keep_period"] = rng.choice([2, 4, 5])
        if rng.random() < 0.15:
            opts["keep_time_interval"] = datetime.timedelta(hours=1)
        if rng.random() < 0.5:
            opts["best_fn"] = _loss
            opts["best_mode"] = rng.choice(["min", "max"])
            opts["keep_checkpoints_without_metrics"] = rng.random() < 0.5
        for name in lib_opts:
            lib_opts[name] = dict(opts)
        return lib_opts["ca"], lib_opts["orbax"], comparable_after_reopen

    interval = rng.choice([1, 2])
    specific = sorted(rng.sample(range(40), 5))
    n = rng.choice([1, 2, 3])
    period = rng.choice([2, 3])
    preservation = rng.choice(["latest", "best", "every", "any"])
    for name, mod in (("ca", ca.checkpoint_managers), ("orbax", orbax.checkpoint_managers)):
        save = mod.AnySavePolicy([mod.FixedIntervalPolicy(interval),
                                  mod.SpecificStepsPolicy(specific),
                                  mod.InitialSavePolicy()])
        best = mod.BestN(get_metric_fn=_loss, reverse=True, n=n,
                         keep_checkpoints_without_metrics=False)
        keep = {"latest": mod.LatestN(n=n), "best": best,
                "every": mod.EveryNSteps(interval_steps=period),
                "any": mod.AnyPreservationPolicy([mod.LatestN(n=1), best])}[preservation]
        lib_opts[name] = {"save_decision_policy": save, "preservation_policy": keep}
    # Orbax reopens a BestN manager without best_fn with no metrics: not comparable.
    comparable_after_reopen = preservation not in ("best", "any")
    return lib_opts["ca"], lib_opts["orbax"], comparable_after_reopen


def random_calls(rng: random.Random, count: int) -> list[tuple]:
    calls = []
    step = rng.randrange(3)
    for _ in range(count):
        r = rng.random()
        if r < 0.1 and calls:
            calls.append(("save", rng.choice(calls)[1] if calls else 0, None, False))  # repeat
            continue
        if r < 0.2:
            calls.append(("should_save", step + rng.randrange(3), None, False))
            continue
        step += rng.choice([1, 1, 1, 2, 3])
        metrics = None if rng.random() < 0.15 else {"loss": round(rng.uniform(0, 10), 2)}
        calls.append(("save", step, metrics, rng.random() < 0.1))
    return calls


def tree_for(step: int) -> dict:
    return {"a": np.arange(4, dtype=np.int32) + step}


def answers(m) -> tuple:
    return (list(m.all_steps()), m.latest_step(), m.best_step())


def run_sync(lib, directory, options: dict, calls: list[tuple]) -> list:
    """Plays ``calls`` on ``lib``'s CheckpointManager (orbax or ckpt_async), recording answers."""
    out = []
    mngr = lib.CheckpointManager(directory, options=lib.CheckpointManagerOptions(**options))
    try:
        for op, step, metrics, force in calls:
            if op == "should_save":
                out.append((op, mngr.should_save(step), answers(mngr)))
                continue
            try:
                saved = mngr.save(step, args=lib.args.StandardSave(tree_for(step)),
                                  metrics=metrics, force=force)
            except Exception as exc:  # noqa: BLE001 - the error's name is compared
                saved = type(exc).__name__
            out.append((op, saved, answers(mngr)))
        mngr.wait_until_finished()
        out.append(("finished", answers(mngr)))
    finally:
        mngr.close()
    return out


def run_orbax(directory, options: dict, calls: list[tuple]) -> list:
    return run_sync(orbax, directory, options, calls)


def run_ca_sync(directory, options: dict, calls: list[tuple]) -> list:
    return run_sync(ca, directory, options, calls)


def run_ca_async(directory, options: dict, calls: list[tuple], in_flight: list | None = None
                 ) -> list:
    async def main() -> list:
        out = []
        mngr = ckpt_async.aio.AsyncCheckpointManager(
            directory, options=ca.CheckpointManagerOptions(max_concurrent_saves=3, **options))
        for op, step, metrics, force in calls:
            if op == "should_save":
                out.append((op, mngr.should_save(step), answers(mngr)))
                continue
            if in_flight is not None:
                in_flight.append(mngr.is_saving_in_progress())
            try:
                fut = await mngr.save(step, args=ca.args.StandardSave(tree_for(step)),
                                      metrics=metrics, force=force)
                saved = fut is not None
            except Exception as exc:  # noqa: BLE001 - the error's name is compared
                saved = type(exc).__name__
            out.append((op, saved, answers(mngr)))
        await asyncio.wait_for(mngr.wait_until_finished(), 30)
        out.append(("finished", answers(mngr)))
        await mngr.close()
        return out

    return asyncio.run(main())


def reopen_answers(lib, directory, options: dict) -> tuple:
    mngr = lib.CheckpointManager(directory, options=lib.CheckpointManagerOptions(**options))
    try:
        return answers(mngr), list(mngr.all_steps(read=True))
    finally:
        mngr.close()


@pytest.fixture
def slow_commit(monkeypatch):
    """Every commit takes 40 ms more, so the async face reads listings with commits in flight."""
    real = ca_commit.commit

    async def slow(*args, **kwargs):
        await asyncio.sleep(0.04)
        return await real(*args, **kwargs)

    monkeypatch.setattr(ca_commit, "commit", slow)


@pytest.mark.parametrize("seed", range(16))
def test_sequence_matches_orbax(tmp_path, seed, slow_commit):
    rng = random.Random(seed)
    ca_opts, orbax_opts, comparable = random_config(rng)
    calls = random_calls(rng, 12)
    expected = run_orbax(tmp_path / "orbax", orbax_opts, calls)
    in_flight: list[bool] = []
    if seed % 2:
        actual = run_ca_async(tmp_path / "ca", ca_opts, calls, in_flight)
        assert any(in_flight)  # some save started while an earlier commit was in flight
    else:
        actual = run_ca_sync(tmp_path / "ca", ca_opts, calls)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a == e, f"call {i} {calls[i] if i < len(calls) else 'end'}: {a} != {e} " \
                       f"(options {ca_opts})"
    on_disk = sorted(int(p.name) for p in (tmp_path / "ca").iterdir() if p.name.isdigit())
    assert on_disk == actual[-1][1][0]
    if comparable:
        reopened = reopen_answers(orbax, tmp_path / "orbax", orbax_opts)
        assert reopen_answers(ca, tmp_path / "ca", ca_opts) == reopened
        # Each library reads the other's directory as its own.
        assert reopen_answers(ca, tmp_path / "orbax", ca_opts) == reopened
        assert reopen_answers(orbax, tmp_path / "ca", orbax_opts) == reopened


@pytest.mark.parametrize("seed", [100, 101])
def test_sequence_continues_after_reopen_like_orbax(tmp_path, seed):
    """Saves, reopens, saves more: both managers agree at every call of the second run."""
    rng = random.Random(seed)
    opts = {"max_to_keep": 2, "save_interval_steps": 2, "best_fn": _loss, "best_mode": "min",
            "keep_checkpoints_without_metrics": False}
    first = random_calls(rng, 6)
    last = max(c[1] for c in first)
    second = [(op, s + last + 1, m, f) for op, s, m, f in random_calls(rng, 6)]
    for calls in (first, second):
        expected = run_orbax(tmp_path / "orbax", opts, calls)
        actual = run_ca_sync(tmp_path / "ca", opts, calls)
        assert actual == expected



# The same calls through each library; each line's outcome ("ok" or the exception's
# builtin base) must be the same. Orbax's runs in a process of its own: a save it refuses
# leaves a thread waiting five minutes for a signal before the interpreter can exit.
_LOCK_IN_CALLS = """
import json, os, sys
import numpy as np
if sys.argv[1] == "orbax":
    import orbax.checkpoint as lib
else:
    import ckpt_async as lib
root, state, outcomes = sys.argv[2], {"a": np.ones(2)}, []

def attempt(call):
    try:
        call()
        outcomes.append("ok")
    except ValueError:
        outcomes.append("ValueError")

mngr = lib.CheckpointManager(root + "/a")
mngr.save(0, args=lib.args.Composite(state=lib.args.StandardSave(state)))
mngr.wait_until_finished()
attempt(lambda: mngr.restore(0, args=lib.args.Composite(state=lib.args.PyTreeRestore())))
attempt(lambda: mngr.restore(0, args=lib.args.Composite(state=lib.args.StandardRestore())))
attempt(lambda: mngr.save(1, args=lib.args.Composite(state=lib.args.PyTreeSave(state))))
mngr.wait_until_finished()
outcomes.append(mngr.all_steps())
mngr = lib.CheckpointManager(root + "/b", item_handlers={"state": lib.StandardCheckpointHandler()})
attempt(lambda: mngr.save(0, args=lib.args.Composite(state=lib.args.StandardSave(state),
                                                     other=lib.args.JsonSave({"k": 1}))))
attempt(lambda: mngr.save(1, args=lib.args.Composite(state=lib.args.StandardSave(state))))
mngr.wait_until_finished()
outcomes.append(mngr.all_steps())
mngr = lib.CheckpointManager(root + "/c", item_names=("state", "cfg"))
attempt(lambda: mngr.save(0, args=lib.args.Composite(state=lib.args.StandardSave(state),
                                                     cfg=lib.args.JsonSave({"k": 1}))))
attempt(lambda: mngr.save(1, args=lib.args.Composite(extra=lib.args.JsonSave({"k": 2}))))
mngr.wait_until_finished()
outcomes.append(mngr.all_steps())
mngr = lib.CheckpointManager(root + "/d")
mngr.save(0, args=lib.args.PyTreeSave(state))
mngr.wait_until_finished()
mngr = lib.CheckpointManager(root + "/d")  # (a restore without args locks in what it recorded)
attempt(lambda: mngr.restore(0))
attempt(lambda: mngr.restore(0, args=lib.args.StandardRestore()))
attempt(lambda: mngr.save(1, args=lib.args.StandardSave(state)))
mngr.wait_until_finished()
outcomes.append(mngr.all_steps())
print(json.dumps(outcomes), flush=True)
os._exit(0)
"""


def test_handler_lock_in_rules_as_orbax_enforces_them(tmp_path):
    # An item locked to StandardCheckpointHandler takes Standard args only; a manager given
    # its items (item_handlers, item_names) takes no other item.
    outcomes = {}
    for lib in ("ckpt_async", "orbax"):
        (tmp_path / lib).mkdir()
        done = subprocess.run([sys.executable, "-c", _LOCK_IN_CALLS, lib, str(tmp_path / lib)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outcomes[lib] = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes["ckpt_async"] == outcomes["orbax"] == [
        "ValueError", "ok", "ValueError", [0], "ValueError", "ok", [1], "ok", "ValueError", [0],
        "ok", "ValueError", "ValueError", [0]]


# (a process of its own for each library: Orbax's refused saves leave threads behind that
# keep an interpreter from exiting for minutes)
_NONE_ITEMS_CALLS = """
import json, os, sys
import numpy as np
if sys.argv[1] == "orbax":
    import orbax.checkpoint as lib
else:
    import ckpt_async as lib
root, mode, out = sys.argv[2], sys.argv[3], []

def outcome(call):
    try:
        return call()
    except ValueError:
        return "ValueError"

handlers = {"state": lib.StandardCheckpointHandler(), "cfg": lib.JsonCheckpointHandler()}
mngr = lib.CheckpointManager(root + "/m", item_handlers=handlers)
if mode == "write":
    out.append(mngr.save(1, args=lib.args.Composite(state=lib.args.StandardSave({"w": np.ones(2)}),
                                                    cfg=None)))
    mngr.wait_until_finished()
    out.append(sorted(n for n in os.listdir(root + "/m/1") if os.path.isdir(root + "/m/1/" + n)))
    out.append(outcome(lambda: mngr.save(2, args=lib.args.Composite(
        state=None, cfg=lib.args.JsonSave({"a": 1})))))
    plain = lib.CheckpointManager(root + "/plain")
    out.append(outcome(lambda: plain.save(1, args=lib.args.Composite(
        state=lib.args.StandardSave({"w": np.ones(2)}), cfg=None))))
    out.append(list(plain.all_steps()))
out.append(sorted(mngr.item_metadata(1).keys()))
restored = mngr.restore(1)
out.append([sorted(restored.keys()), restored["cfg"], restored["state"]["w"].tolist()])
out.append(dict(mngr.restore(1, args=lib.args.Composite(cfg=None)).items()))
print(json.dumps(out), flush=True)
os._exit(0)
"""


def test_an_item_saved_as_none_as_orbax_saves_it(tmp_path):
    # Handed to its configured handler: a JSON item is written as null (a folder either
    # library reads back as None), a pytree item refuses it, and with no handler configured
    # the save is refused. (ckpt_async wrote no folder before round 36: Orbax left it out.)
    def run(lib, root, mode):
        done = subprocess.run([sys.executable, "-c", _NONE_ITEMS_CALLS, lib, str(root), mode],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    written = {lib: run(lib, tmp_path / lib, "write") for lib in ("ckpt_async", "orbax")}
    assert written["ckpt_async"] == written["orbax"] == [
        True, ["cfg", "state"], "ValueError", "ValueError", [], ["cfg", "state"],
        [["cfg", "state"], None, [1.0, 1.0]], {"cfg": None}]
    assert run("orbax", tmp_path / "ckpt_async", "read") == written["orbax"][5:]
    assert run("ckpt_async", tmp_path / "orbax", "read") == written["orbax"][5:]


def test_step_name_formats_of_either_library_name_steps_alike(tmp_path):
    state = {"a": np.ones(2)}
    formats = {"ckpt_async": ca.path.step.standard_name_format(step_prefix="ckpt",
                                                               step_format_fixed_length=4),
               "orbax": orbax.path.step.standard_name_format(step_prefix="ckpt",
                                                             step_format_fixed_length=4)}
    for name, nf in formats.items():
        with ca.CheckpointManager(tmp_path / name,
                                  options=ca.CheckpointManagerOptions(step_name_format=nf)) as m:
            m.save(3, args=ca.args.StandardSave(state))
            m.save(12, args=ca.args.StandardSave(state))
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["ckpt_0003", "ckpt_0012"]
        with orbax.CheckpointManager(tmp_path / name, options=orbax.CheckpointManagerOptions(
                step_name_format=formats["orbax"])) as om:
            assert om.all_steps() == [3, 12]

    class Odd:
        def build_name(self, step):
            return f"s{step}"

    with pytest.raises(ca.errors.InvalidArgumentError, match="step_name_format"):
        ca.CheckpointManager(tmp_path / "odd",
                             options=ca.CheckpointManagerOptions(step_name_format=Odd()))


def _pax_like_format(lib):
    """A format of one's own, as Pax writes one: a NameFormat subclass naming steps
    ``checkpoint_<8 digits>`` and finding them itself."""
    import dataclasses
    import pathlib

    @dataclasses.dataclass(frozen=True)
    class PaxLike(lib.step.NameFormat):
        def build_name(self, step):
            return f"checkpoint_{step:08d}"

        def build_metadata(self, step_path, step=None):
            step_path = pathlib.Path(step_path)
            if lib.utils.is_tmp_checkpoint(step_path) or \
                    not step_path.name.startswith("checkpoint_"):
                return None
            return lib.step.Metadata(step=int(step_path.name[11:]), path=step_path)

        def find_step(self, base_path, step):
            found = self.build_metadata(lib.step.build_step_path(base_path, self, step))
            if found is None or not found.path.exists():
                raise ValueError(f"no step {step}")
            return found

        def find_all(self, base_path):
            return lib.step.build_step_metadatas(pathlib.Path(base_path).iterdir(),
                                                 self.build_metadata)

    return PaxLike()


@pytest.mark.parametrize(("writer", "reader"), [("ckpt_async", "ckpt_async"),
                                                ("ckpt_async", "orbax"), ("orbax", "ckpt_async")])
def test_a_name_format_of_ones_own_finds_its_steps_again(tmp_path, writer, reader):
    libs = {"ckpt_async": ca, "orbax": orbax}
    w, r = libs[writer], libs[reader]
    with w.CheckpointManager(tmp_path, options=w.CheckpointManagerOptions(
            step_name_format=_pax_like_format(w))) as m:
        for step in (7, 12):
            m.save(step, args=w.args.StandardSave({"a": np.full(2, step)}))
    (tmp_path / "notes").mkdir()  # (not a step in this format)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint_")) == [
        "checkpoint_00000007", "checkpoint_00000012"]
    nf = _pax_like_format(r)
    with r.CheckpointManager(tmp_path, options=r.CheckpointManagerOptions(
            step_name_format=nf)) as m:
        assert m.all_steps() == [7, 12] and m.latest_step() == 12
        np.testing.assert_array_equal(m.restore(7)["a"], np.full(2, 7))
    assert r.step.latest_step_metadata(tmp_path, nf).step == 12
    assert r.step.find_step_path(tmp_path, nf, step=7).name == "checkpoint_00000007"


def test_formats_built_on_the_standard_one_list_steps_without_hanging(tmp_path):
    # A subclass filtering super().find_all(), and several managers at once listing through a
    # composite of standard formats: each listing waits on the engine loop from a thread,
    # which must not be one of the bounded pool's (they ran out, and the listing hung).
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class EvenOnly(ca.step.NameFormat):
        def find_all(self, base_path):
            return (m for m in super().find_all(base_path) if m.step % 2 == 0)

    with ca.CheckpointManager(tmp_path) as m:
        for step in (1, 2, 4):
            m.save(step, args=ca.args.StandardSave({"a": np.ones(2)}))
    (tmp_path / "6.orbax-checkpoint-tmp-1").mkdir()  # (a leftover is no step)

    def reopen(nf):
        with ca.CheckpointManager(tmp_path, options=ca.CheckpointManagerOptions(
                step_name_format=nf)) as m:
            return m.all_steps()

    assert in_thread(lambda: reopen(EvenOnly())) == [2, 4]
    std = ca.step.standard_name_format()
    both = ca.step.composite_name_format(std, [std, ca.step.standard_name_format("x")])
    n = 2 * ca._runtime.DEFAULT_THREADS
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        listed = in_thread(lambda: list(pool.map(lambda _: reopen(both), range(n))))
    assert listed == [[1, 2, 4]] * n


def test_step_helpers_answer_as_orbax(tmp_path):
    with ca.CheckpointManager(tmp_path, options=ca.CheckpointManagerOptions(
            step_prefix="ckpt")) as m:
        for step in (3, 10):
            m.save(step, args=ca.args.StandardSave({"a": np.ones(2)}))
    (tmp_path / "ckpt_11.orbax-checkpoint-tmp-123").mkdir()
    for lib in (ca, orbax):
        nf = lib.step.standard_name_format(step_prefix="ckpt")
        st = lib.step
        assert sorted(st.checkpoint_steps(tmp_path)) == [3, 10], lib
        assert st.is_path_finalized(tmp_path / "ckpt_3") and \
            not st.is_path_finalized(tmp_path / "ckpt_11.orbax-checkpoint-tmp-123")
        assert st.latest_step_metadata(tmp_path, nf).step == 10
        assert {m.step for m in nf.find_all(tmp_path)} == {3, 10}
        assert nf.find_step(tmp_path, 3).path.name == "ckpt_3"
        with pytest.raises(ValueError):
            nf.find_step(tmp_path, 4)
        assert st.maybe_find_step_metadata(tmp_path, nf, step=4) is None
        assert st.find_step_path(tmp_path, nf, step=11, include_uncommitted=True).name == \
            "ckpt_11.orbax-checkpoint-tmp-123"
        assert st.step_from_checkpoint_name("ckpt_0012") == 12
        assert st.step_from_checkpoint_name("ckpt_11.orbax-checkpoint-tmp-123") == 11
        assert f"ckpt_5{st.TMP_DIR_SUFFIX}".endswith(".orbax-checkpoint-tmp")
        assert str(st.get_save_directory(5, tmp_path, "state", step_prefix="ckpt",
                                         step_format_fixed_length=3)) == \
            str(tmp_path / "ckpt_005" / "state")
        both = st.composite_name_format(nf, [nf, st.standard_name_format()])
        assert both.build_name(4) == "ckpt_4"
        assert sorted(m.step for m in both.find_all(tmp_path)) == [3, 10]


# -- single calls, each run against both libraries ---------------------------------------------
def _outcome(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the exception's kind is the outcome compared
        # (the most specific of the builtins Orbax raises: ckpt_async's InvalidTypeError is
        # a ValueError too, as every InvalidArgumentError)
        return next((k.__name__ for k in (TypeError, FileNotFoundError, ValueError)
                     if isinstance(exc, k)), type(exc).__name__)


def _policy_beside_legacy_fields(lib, d):
    cm = lib.checkpoint_managers
    out = []
    opts = lib.CheckpointManagerOptions(save_interval_steps=5,
                                        save_decision_policy=cm.FixedIntervalPolicy(2))
    with lib.CheckpointManager(d / "a", options=opts) as m:
        out.append([m.should_save(s) for s in range(5)])  # the policy decides
    opts = lib.CheckpointManagerOptions(
        best_fn=_loss, best_mode="min",
        preservation_policy=cm.BestN(get_metric_fn=_loss, reverse=True, n=2))
    with lib.CheckpointManager(d / "b", options=opts) as m:
        for s, loss in [(0, 3.0), (1, 1.0), (2, 2.0), (3, 5.0)]:
            m.save(s, args=lib.args.StandardSave({"a": np.arange(3)}), metrics={"loss": loss})
        m.wait_until_finished()
        out.append([m.all_steps(), m.best_step(), m.metrics(1), m.metrics(3), m.metrics(9)])
    for legacy in ({"max_to_keep": 0}, {"max_to_keep": 2}, {"keep_period": 3},
                   {"keep_time_interval": datetime.timedelta(hours=1)}):
        opts = lib.CheckpointManagerOptions(preservation_policy=cm.LatestN(1), **legacy)
        out.append(_outcome(lambda o=opts: lib.CheckpointManager(d / "c", options=o).close()))
    opts = lib.CheckpointManagerOptions(step_prefix="x", step_name_format=(
        lib.path.step.standard_name_format(step_prefix="y")))
    with lib.CheckpointManager(d / "e", options=opts) as m:
        m.save(1, args=lib.args.StandardSave({"a": np.arange(3)}))
    out.append(sorted(p.name for p in (d / "e").iterdir()))
    return out


def _step_names_and_times(lib, d):
    # (steps written by Orbax: ckpt_async's step documents carry a checksum, so one edited
    # below would read as damaged, which is also dated from its directory)
    out = []
    for name in ("007", "020", "1234", "ck_0005", "ck_01", "ck_010"):
        with orbax.CheckpointManager(d / "w") as m:
            m.save(7, args=orbax.args.StandardSave({"a": np.arange(3)}))
        (d / "w" / "7").rename(d / name)
    with lib.CheckpointManager(d, options=lib.CheckpointManagerOptions(create=False)) as m:
        out.append(m.all_steps())
    opts = lib.CheckpointManagerOptions(step_prefix="ck", step_format_fixed_length=3)
    with lib.CheckpointManager(d, options=opts) as m:
        out.append(m.all_steps())
    # A step whose _CHECKPOINT_METADATA records no commit time dates from its directory's.
    meta = d / "1234" / "_CHECKPOINT_METADATA"
    doc = json.loads(meta.read_text())
    doc.pop("commit_timestamp_nsecs")
    meta.write_text(json.dumps(doc))
    opts = lib.CheckpointManagerOptions(
        save_decision_policy=lib.checkpoint_managers.ContinuousCheckpointingPolicy(
            minimum_interval_secs=3600))
    with lib.CheckpointManager(d, options=opts) as m:
        out.append(m.should_save(1235))
    return out


def _metadata_and_arguments(lib, d):
    out = []
    opts = lib.CheckpointManagerOptions(save_root_metadata=False)
    with lib.CheckpointManager(d / "r", options=opts, metadata={"run": "abc"}) as m:
        out.append(m.metadata().custom_metadata)
    out.append(sorted(p.name for p in (d / "r").iterdir()))
    with lib.CheckpointManager(d / "r", metadata={"run": "abc"}) as m:
        out.append(m.metadata().custom_metadata)
        m.save(0, args=lib.args.StandardSave({"a": np.arange(3)}))
        out.append(_outcome(lambda: m.item_metadata(None)))
        out.append(_outcome(lambda: m.save("3", args=lib.args.StandardSave({"a": 1}))))
    registry = lib.handlers.DefaultCheckpointHandlerRegistry()
    for kwargs in ({"item_names": ("a",), "item_handlers": lib.StandardCheckpointHandler()},
                   {"item_handlers": {"a": lib.StandardCheckpointHandler()},
                    "handler_registry": registry},
                   {"item_names": ("a",), "handler_registry": registry}):
        out.append(_outcome(lambda k=kwargs: lib.CheckpointManager(d / "k", **k).close()))
    for fields in ({"todelete_subdir": "a", "todelete_full_path": "b"},
                   {"enable_per_process_directory_creation": True}):
        out.append(_outcome(lambda f=fields: lib.CheckpointManagerOptions(**f)))
    out.append(sorted(lib.CheckpointManagerOptions(save_on_steps=[4, 2]).save_on_steps))
    return out


class _Entries:
    def __init__(self):
        self.entries = []

    def log_entry(self, entry):
        self.entries.append(entry)


def _logger_entries(lib, d):
    logger = type("Entries", (_Entries, lib.logging.AbstractLogger), {})()
    with lib.CheckpointManager(d, logger=logger) as m:
        m.save(0, args=lib.args.StandardSave({"a": np.arange(3)}))
        m.wait_until_finished()
        m.restore(0)
    return [(e["event_type"], e["step"], sorted(k for k, v in e.items() if v is not None))
            for e in logger.entries]


def _as_lists(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), dict(tree))


def _legacy_checkpointers(lib, d):
    # Orbax's older constructor (octo's load/save_pretrained, Orbax's preemption notebook):
    # one checkpointer (the default item) or a dict of them; save(step, items); restore(step,
    # items=..., restore_kwargs=...).
    out = []
    tree = {"w": np.arange(4.0), "b": np.ones(2, np.float32)}
    opts = lib.CheckpointManagerOptions(max_to_keep=2)
    with lib.CheckpointManager(d / "one", lib.PyTreeCheckpointer(), opts) as m:
        for step in (1, 2, 3):
            out.append(m.save(step, {k: v * step for k, v in tree.items()}))
            out.append(m.all_steps())  # (a synchronous checkpointer: committed on return)
        out.append(_as_lists(m.restore(3)))
        out.append(_as_lists(m.restore(2, items={"w": np.zeros(4), "b": np.zeros(2, np.float32)},
                                       restore_kwargs={"restore_args": {
                                           "w": lib.RestoreArgs(dtype=np.float32),
                                           "b": lib.RestoreArgs()}})))
    checkpointers = {"params": lib.AsyncCheckpointer(lib.PyTreeCheckpointHandler()),
                     "meta": lib.Checkpointer(lib.JsonCheckpointHandler())}
    with lib.CheckpointManager(d / "two", checkpointers, opts) as m:
        out.append(m.save(5, {"params": tree, "meta": {"lr": 0.1}}))
        m.wait_until_finished()
        out.append(sorted(p.name for p in (d / "two" / "5").iterdir() if p.is_dir()))
        both = m.restore(5)
        out.append([_as_lists(both["params"]), both["meta"]])
        only = m.restore(5, items={"meta": None})
        out.append([sorted(only.keys()), only["meta"]])
    out.append(_outcome(lambda: lib.CheckpointManager(d / "bad", {"x": object()})))
    return out


def _legacy_items_with_item_handlers(lib, d):
    # openpi's checkpoints.py: a manager made with item_handlers, saved and restored with
    # Orbax's older items (positional, items=), as in save_state / restore_state.
    out = []
    state = {"params": {"w": np.arange(3.0)}, "step": np.asarray(7)}
    handlers = {"assets": lib.JsonCheckpointHandler(),
                "train_state": lib.PyTreeCheckpointHandler()}
    with lib.CheckpointManager(d / "m", item_handlers=handlers,
                               options=lib.CheckpointManagerOptions(max_to_keep=1)) as m:
        out.append(m.save(10, {"train_state": state, "assets": {"norm": [1, 2]}}))
        m.wait_until_finished()
        restored = m.restore(10, items={"train_state": state})
        out.append([sorted(restored.keys()), _as_lists(restored["train_state"]["params"])])
        out.append(_outcome(lambda: m.restore(10, items={"nope": state})))
    with lib.CheckpointManager(d / "s", item_handlers=lib.StandardCheckpointHandler()) as m:
        out.append(m.save(1, state))
        m.wait_until_finished()
        out.append(_as_lists(m.restore(1, state)["params"]))
    return out


def _broadcast_option_against_the_name_format(lib, d):
    # single_host_load_and_broadcast of the options and of step_name_format must agree
    fmt = lib.step.standard_name_format
    out = [_outcome(lambda: lib.CheckpointManagerOptions(
        single_host_load_and_broadcast=True, step_name_format=fmt()) and "ok"),
        _outcome(lambda: lib.CheckpointManagerOptions(
            step_name_format=fmt(single_host_load_and_broadcast=True)) and "ok")]
    opts = lib.CheckpointManagerOptions(
        single_host_load_and_broadcast=True,
        step_name_format=fmt(step_prefix="s", single_host_load_and_broadcast=True))
    with lib.CheckpointManager(d, options=opts) as m:
        out.append(m.save(3, args=lib.args.StandardSave({"w": np.ones(2)})))
        m.wait_until_finished()
        out.append([m.all_steps(), m.all_steps(read=True), sorted(os.listdir(d))])
    return out


def _an_empty_step_prefix(lib, d):
    # step_prefix="" is a prefix: its underscore is written ("_7"), as Orbax writes it, and
    # a name without it is no step of that format
    out = []
    (d / "3").mkdir()
    for opts in ({"step_prefix": ""}, {"step_prefix": "", "step_format_fixed_length": 3}):
        with lib.CheckpointManager(d / str(len(opts)),
                                   options=lib.CheckpointManagerOptions(**opts)) as m:
            m.save(7, args=lib.args.StandardSave({"a": np.arange(3)}))
            m.wait_until_finished()
            out.append([m.all_steps(), sorted(os.listdir(d / str(len(opts))))])
    with lib.CheckpointManager(d, options=lib.CheckpointManagerOptions(step_prefix="")) as m:
        out.append(m.all_steps())
    out.append(lib.step.standard_name_format(step_prefix="").build_name(5))
    return out


def _an_unfinished_orbax_save_of_the_step(lib, d):
    # Orbax's temporary directory of a step (<name>.orbax-checkpoint-tmp, left by a save
    # that did not finish) is removed by the next save of that step, without
    # cleanup_tmp_directories; another step's, or a temporary name with a suffix, stays
    out = []
    for name in ("ck_5.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp",
                 "ck_6.orbax-checkpoint-tmp/default", "ck_5.orbax-checkpoint-tmp-123/default"):
        (d / "m" / name).mkdir(parents=True)
    with lib.CheckpointManager(d / "m", options=lib.CheckpointManagerOptions(
            step_prefix="ck")) as m:
        out.append(m.save(5, args=lib.args.StandardSave({"a": np.arange(3)})))
        m.wait_until_finished()
        out.append(m.all_steps())
    out.append(sorted(os.listdir(d / "m")))
    (d / "c" / "x.orbax-checkpoint-tmp").mkdir(parents=True)
    with lib.StandardCheckpointer() as ckptr:
        ckptr.save(d / "c" / "x", {"a": np.arange(3)})
    out.append(sorted(os.listdir(d / "c")))
    return out


def _a_step_of_named_items_read_as_one_item(lib, d):
    # A manager of one unnamed item asked for a step saved with named items, without args: a
    # ValueError (the manager's mode does not fit the step), not a missing checkpoint
    # (FileNotFoundError, which training loops take for "start from scratch")
    with lib.CheckpointManager(d) as m:
        m.save(1, args=lib.args.Composite(state=lib.args.StandardSave({"a": np.arange(3)})))
    out = []
    with lib.CheckpointManager(d, item_handlers=lib.StandardCheckpointHandler()) as m:
        out.append(_outcome(lambda: m.restore(1)))
        out.append(_outcome(lambda: m.item_metadata(1)))
        out.append(_outcome(lambda: m.metadata(1)))
    return out


def _root_metadata_an_older_orbax_wrote(lib, d):
    # Orbax before 0.10 kept a manager's metadata in metadata/metadata (the JSON item of a
    # Checkpointer(JsonCheckpointHandler())): read where metadata/_ROOT_METADATA is missing,
    # whatever the options; a manager given metadata writes _ROOT_METADATA beside it, which
    # is read from then on
    out = []
    (d / "metadata").mkdir()
    (d / "metadata" / "metadata").write_text(json.dumps({"run": "abc", "lr": 0.5}))
    for opts, meta in (({}, None), ({"read_only": True}, {"run": "given"}),
                       ({"save_root_metadata": False}, {"run": "given"})):
        with lib.CheckpointManager(d, options=lib.CheckpointManagerOptions(**opts),
                                   metadata=meta) as m:
            out.append(m.metadata().custom_metadata)
    out.append(sorted(os.listdir(d / "metadata")))
    with lib.CheckpointManager(d, metadata={"run": "new"}) as m:
        out.append(m.metadata().custom_metadata)
    with lib.CheckpointManager(d) as m:
        out.append(m.metadata().custom_metadata)
    out.append(sorted(os.listdir(d / "metadata")))
    # (a document with its own custom_metadata field: that field)
    (d / "o" / "metadata").mkdir(parents=True)
    (d / "o" / "metadata" / "metadata").write_text(json.dumps(
        {"custom_metadata": {"run": "abc"}, "internal_metadata": {}}))
    with lib.CheckpointManager(d / "o") as m:
        out.append(m.metadata().custom_metadata)
    return out


class _FailingResult:
    def result(self, timeout=None):
        raise SystemError("the handler's write failed")


def _a_synchronous_save_that_fails(lib, d):
    # A synchronous save (a Checkpointer, or enable_async_checkpointing=False) raises its
    # failure itself: told once, not again by wait_until_finished(), the next save or close()
    class Failing(lib.PyTreeCheckpointHandler):
        async def async_save(self, directory, *args, **kwargs):
            return [*(await super().async_save(directory, *args, **kwargs) or []),
                    _FailingResult()]

    def raised(fn):
        try:
            fn()
        except Exception:  # noqa: BLE001 - whether it raised is compared (SystemError in
            return "raised"  # Orbax, a CommitError in ckpt_async)
        return "ok"

    out = []
    m = lib.CheckpointManager(d / "c", lib.Checkpointer(Failing()))
    out.append(raised(lambda: m.save(0, {"a": np.arange(3)})))
    out += [m.all_steps(), raised(m.wait_until_finished), raised(m.check_for_errors)]
    out.append(raised(lambda: m.save(1, {"a": np.arange(3)})))
    out += [m.all_steps(), raised(m.close)]
    m = lib.CheckpointManager(d / "o", item_handlers=Failing(),
                              options=lib.CheckpointManagerOptions(
                                  enable_async_checkpointing=False))
    out.append(raised(lambda: m.save(0, args=lib.args.PyTreeSave({"a": np.arange(3)}))))
    out += [m.all_steps(), raised(m.wait_until_finished), raised(m.close)]
    # Orbax's older constructor saves as its checkpointers do: an AsyncCheckpointer in the
    # background, whatever enable_async_checkpointing says (its failure comes at the wait)
    m = lib.CheckpointManager(d / "a", lib.AsyncCheckpointer(Failing()),
                              lib.CheckpointManagerOptions(enable_async_checkpointing=False))
    out.append(raised(lambda: m.save(0, {"a": np.arange(3)})))
    out += [raised(m.wait_until_finished), m.all_steps(), raised(m.close)]
    return out


@pytest.mark.parametrize("case", [_policy_beside_legacy_fields, _step_names_and_times,
                                  _metadata_and_arguments, _logger_entries,
                                  _legacy_checkpointers, _legacy_items_with_item_handlers,
                                  _broadcast_option_against_the_name_format,
                                  _an_empty_step_prefix, _an_unfinished_orbax_save_of_the_step,
                                  _a_step_of_named_items_read_as_one_item,
                                  _root_metadata_an_older_orbax_wrote,
                                  _a_synchronous_save_that_fails])
def test_manager_calls_answer_as_orbax(tmp_path, case):
    answers = {}
    for name, lib in (("ckpt_async", ca), ("orbax", orbax)):
        (tmp_path / name).mkdir()
        answers[name] = json.loads(json.dumps(case(lib, tmp_path / name), default=str))
    assert answers["ckpt_async"] == answers["orbax"]


def test_step_directories_take_the_permissions_file_options_give_as_in_orbax(tmp_path):
    modes = {}
    for name, lib in (("ckpt_async", ca), ("orbax", orbax)):
        options = lib.CheckpointManagerOptions(
            file_options=lib.checkpoint_manager.FileOptions(path_permission_mode=0o770))
        with lib.CheckpointManager(tmp_path / name, options=options) as mngr:
            mngr.save(1, args=lib.args.StandardSave({"a": np.arange(3)}))
        modes[name] = (tmp_path / name / "1").stat().st_mode & 0o777
    assert modes["ckpt_async"] == modes["orbax"]
    assert modes["ckpt_async"] & 0o007 == 0  # (not readable by others)
