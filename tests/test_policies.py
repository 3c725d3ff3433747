"""Save-decision and preservation policies, checked side by side against Orbax 0.12.8."""

from __future__ import annotations

import datetime
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]

import orbax.checkpoint.checkpoint_managers as ocm  # noqa: E402
from orbax.checkpoint import options as o_options  # noqa: E402
from orbax.checkpoint._src.checkpoint_managers import (  # noqa: E402
    preservation_policy as o_pp,
)
from orbax.checkpoint._src.metadata.checkpoint_info import (  # noqa: E402
    CheckpointInfo as OInfo,
)

from ckpt_async import checkpoint_managers as cm  # noqa: E402
from ckpt_async.checkpoint_managers import preservation_policy as pp  # noqa: E402
from ckpt_async.checkpoint_managers import save_decision_policy as sdp  # noqa: E402

UTC = datetime.UTC
BASE = datetime.datetime(2024, 1, 1, tzinfo=UTC)
SEC = datetime.timedelta(seconds=1)
US = datetime.timedelta(microseconds=1)
CASES = 400


def info(step, secs=0.0, metrics=None):
    return cm.CheckpointInfo(step, BASE + datetime.timedelta(seconds=secs), metrics)


def infos(*steps):
    """Checkpoints at the given steps, step N saved N seconds after BASE."""
    return [info(s, s) for s in steps]


PCTX = cm.PreservationContext()


def ctx(saving=False, preempt=False):
    return cm.DecisionContext(is_saving_in_progress=saving, reached_preemption=preempt)


# --------------------------------------------------------------------------- random inputs
def _rand_raw(rng: random.Random, n: int) -> list[tuple]:
    """n (step, time, metrics) triples, steps strictly increasing, times non-decreasing."""
    step = rng.randint(0, 30)
    t = BASE + datetime.timedelta(seconds=rng.randint(0, 100))
    out = []
    for _ in range(n):
        metrics = rng.choice(
            [
                None,
                {"loss": rng.choice([0.1, 0.2, 0.3, 0.5])},  # small set: many ties
                {"loss": rng.randint(-3, 3), "acc": rng.random()},
            ]
        )
        out.append((step, t, metrics))
        step += rng.choice([1, 1, 2, 3, 5, 7, 10, 15, rng.randint(1, 60)])
        gap = datetime.timedelta(seconds=rng.choice([0, 1, 4, 5, 6, 10, rng.randint(0, 40)]))
        t += max(gap + rng.choice([0 * US, 0 * US, US, -US]), 0 * US)
    return out


def _both(raw):
    return [cm.CheckpointInfo(*r) for r in raw], [OInfo(*r) for r in raw]


def _pair(name, *args, **kwargs):
    return getattr(pp, name)(*args, **kwargs), getattr(o_pp, name)(*args, **kwargs)


def _rand_preservation_pair(rng: random.Random, kind: str):
    """(ours, orbax) instances of the policy `kind` with random arguments."""
    match kind:
        case "PreserveAll":
            return _pair(kind)
        case "LatestN":
            return _pair(kind, n=rng.choice([None, 0, 1, 2, 3, 5, 10]))
        case "EveryNSeconds":
            return _pair(kind, interval_secs=rng.choice([0, 1, 5, 10, 30]))
        case "EveryNSteps":
            return _pair(
                kind,
                interval_steps=rng.choice([0, 1, 2, 3, 5, 10, -3]),
                exact_interval=rng.random() < 0.5,
                max_to_keep=rng.choice([None, 0, 1, 2, 4, -1]),
            )
        case "EveryNStepsClosest":
            return _pair(
                kind,
                interval_steps=rng.choice([0, 1, 2, 4, 5, 10, 20, -4]),
                max_to_keep=rng.choice([None, 0, 1, 2, 3, -1]),
            )
        case "CustomSteps":
            return _pair(kind, steps=rng.sample(range(0, 200), rng.randint(0, 40)))
        case "BestN":
            key = rng.choice(["loss", "acc"])
            return _pair(
                kind,
                get_metric_fn=lambda m, key=key: m.get(key, 0.0),
                reverse=rng.random() < 0.5,
                n=rng.choice([None, 0, 1, 2, 3, 6, -1]),
                keep_checkpoints_without_metrics=rng.random() < 0.5,
            )
        case "AnyPreservationPolicy":
            kids = [
                _rand_preservation_pair(rng, rng.choice(SIMPLE_PRESERVATION))
                for _ in range(rng.randint(1, 3))
            ]
            return pp.AnyPreservationPolicy([a for a, _ in kids]), o_pp.AnyPreservationPolicy(
                [b for _, b in kids]
            )
    raise AssertionError(kind)


SIMPLE_PRESERVATION = [
    "PreserveAll",
    "LatestN",
    "EveryNSeconds",
    "EveryNSteps",
    "EveryNStepsClosest",
    "CustomSteps",
    "BestN",
]


def _decisions(policy, checkpoints, context=PCTX):
    try:
        return ("ok", [bool(x) for x in policy.should_preserve(checkpoints, context=context)])
    except Exception as e:  # the exception type is the outcome compared: ckpt_async's
        # errors by the builtin they mix in (an InvalidArgumentError is Orbax's ValueError)
        return ("raise", next(c for c in type(e).__mro__ if c.__module__ == "builtins"))


@pytest.mark.parametrize("kind", [*SIMPLE_PRESERVATION, "AnyPreservationPolicy"])
def test_preservation_matches_orbax(kind):
    rng = random.Random(f"preserve-{kind}")
    seen = set()
    for case in range(CASES):
        ours, theirs = _rand_preservation_pair(rng, kind)
        raw = _rand_raw(rng, rng.randint(0, 12))
        mine, orb = _both(raw)
        got = _decisions(ours, mine)
        want = _decisions(theirs, orb, o_pp.PreservationContext())
        assert got == want, (case, ours, raw)
        seen.add(str(want[1]))
    assert len(seen) > 10  # the random cases really exercise different outcomes


def test_latest_duration_matches_orbax(monkeypatch):
    rng = random.Random("latest-duration")
    for case in range(CASES):
        duration = datetime.timedelta(seconds=rng.choice([0, 1, 5, 30, 120]))
        raw = _rand_raw(rng, rng.randint(0, 12))
        if raw:  # put "now" right at one checkpoint's age boundary
            _, t, _ = rng.choice(raw)
            now = t + duration + rng.choice([-US, 0 * US, US, 3 * SEC])
        else:
            now = BASE
        fake_dt = type(
            "FakeDatetime",
            (datetime.datetime,),
            {"now": staticmethod(lambda tz=None, now=now: now)},
        )
        monkeypatch.setattr(
            o_pp,
            "datetime",
            types.SimpleNamespace(
                datetime=fake_dt, timedelta=datetime.timedelta, timezone=datetime.timezone
            ),
        )
        monkeypatch.setattr(pp, "_utcnow", lambda now=now: now)
        mine, orb = _both(raw)
        want = o_pp.LatestDuration(duration).should_preserve(
            orb, context=o_pp.PreservationContext()
        )
        assert pp.LatestDuration(duration).should_preserve(mine, context=PCTX) == want, case


# --------------------------------------------------------------------- save-decision side by side
o_sdp_ctx_opts = o_options.MultiprocessingOptions()


def _rand_save_pair(rng: random.Random, kind: str):
    match kind:
        case "FixedIntervalPolicy":
            iv = rng.choice([1, 2, 3, 5, 10, -4])
            return sdp.FixedIntervalPolicy(iv), ocm.FixedIntervalPolicy(iv)
        case "SpecificStepsPolicy":
            steps = rng.sample(range(0, 150), rng.randint(0, 30))
            steps = rng.choice([set, list, tuple, frozenset])(steps)
            return sdp.SpecificStepsPolicy(steps), ocm.SpecificStepsPolicy(steps)
        case "ContinuousCheckpointingPolicy":
            secs = rng.choice([None, 0, 1, 5, 10, 30])
            return (
                sdp.ContinuousCheckpointingPolicy(minimum_interval_secs=secs),
                ocm.ContinuousCheckpointingPolicy(minimum_interval_secs=secs),
            )
        case "PreemptionCheckpointingPolicy" | "InitialSavePolicy":
            return getattr(sdp, kind)(), getattr(ocm, kind)()
        case "AnySavePolicy":
            kids = [_rand_save_pair(rng, rng.choice(SIMPLE_SAVE)) for _ in range(rng.randint(0, 3))]
            return sdp.AnySavePolicy([a for a, _ in kids]), ocm.AnySavePolicy([b for _, b in kids])
    raise AssertionError(kind)


SIMPLE_SAVE = [
    "FixedIntervalPolicy",
    "SpecificStepsPolicy",
    "ContinuousCheckpointingPolicy",
    "PreemptionCheckpointingPolicy",
    "InitialSavePolicy",
]


@pytest.mark.parametrize("kind", [*SIMPLE_SAVE, "AnySavePolicy"])
def test_save_decision_matches_orbax(kind):
    rng = random.Random(f"save-{kind}")
    outcomes = set()
    for case in range(CASES):
        ours, theirs = _rand_save_pair(rng, kind)
        raw = _rand_raw(rng, rng.randint(1, 7))
        mine, orb = _both(raw)
        saving, preempt = rng.random() < 0.3, rng.random() < 0.2
        got = ours.should_save(mine[-1], mine[:-1], context=ctx(saving, preempt))
        want = theirs.should_save(
            orb[-1],
            orb[:-1],
            context=ocm.DecisionContext(
                is_saving_in_progress=saving,
                reached_preemption=preempt,
                multiprocessing_options=o_sdp_ctx_opts,
            ),
        )
        assert got is want, (case, ours, raw, saving, preempt)
        outcomes.add(want)
    assert outcomes == {True, False}


# ------------------------------------------------------------------------ unit tests: preservation
def keep(policy, checkpoints):
    return list(policy.should_preserve(checkpoints, context=PCTX))


def test_preserve_all_and_empty_inputs():
    assert keep(cm.PreserveAll(), infos(1, 2, 3)) == [True] * 3
    for policy in [
        cm.PreserveAll(),
        cm.LatestN(2),
        cm.EveryNSeconds(5),
        cm.EveryNSteps(5),
        cm.EveryNStepsClosest(5),
        cm.CustomSteps([1]),
        cm.BestN(get_metric_fn=lambda m: m["loss"], n=1),
        cm.AnyPreservationPolicy([cm.LatestN(1)]),
    ]:
        assert keep(policy, []) == [], policy


def test_latest_n():
    ckpts = infos(1, 2, 3, 4, 5)
    assert keep(cm.LatestN(), ckpts) == [True] * 5
    assert keep(cm.LatestN(2), ckpts) == [False, False, False, True, True]
    assert keep(cm.LatestN(5), ckpts) == [True] * 5
    assert keep(cm.LatestN(0), ckpts) == [False] * 5
    # Orbax returns a list longer than the input for n < 0; ours treats it as 0.
    assert keep(cm.LatestN(-1), ckpts) == [False] * 5


def test_every_n_seconds_boundaries_and_greedy_anchor():
    ckpts = [info(0, 0), info(1, 5 - 1e-6), info(2, 5), info(3, 9), info(4, 10)]
    # Exactly 5 s after the last *kept* one is kept; 9 s is only 4 s after step 2.
    assert keep(cm.EveryNSeconds(5), ckpts) == [True, False, True, False, True]
    assert keep(cm.EveryNSeconds(0), ckpts) == [True] * 5
    assert keep(cm.EveryNSeconds(100), ckpts) == [True, False, False, False, False]


def test_every_n_steps():
    ckpts = infos(0, 3, 5, 8, 10, 16)
    assert keep(cm.EveryNSteps(5), ckpts) == [True, False, True, False, True, False]
    inexact = cm.EveryNSteps(5, exact_interval=False)
    assert keep(inexact, ckpts) == [True, False, True, False, True, True]
    assert keep(cm.EveryNSteps(5, max_to_keep=2), ckpts) == [False, False, True, False, True, False]
    # Orbax quirk kept: max_to_keep=0 slices [:-0] == [] and so removes nothing.
    assert keep(cm.EveryNSteps(5, max_to_keep=0), ckpts) == keep(cm.EveryNSteps(5), ckpts)
    policy = cm.EveryNSteps(0)  # like Orbax, the error comes at decision time
    with pytest.raises(ValueError, match="interval_steps"):
        keep(policy, ckpts)


def test_every_n_steps_closest():
    ckpts = infos(0, 9, 12, 19, 22, 27)
    # Grid 0,10,20,30: 0 -> 0; 9 beats 12 for 10; 19 beats 22 for 20; 27 is last (and nearest 30).
    assert keep(cm.EveryNStepsClosest(10), ckpts) == [True, True, False, True, False, True]
    # Equal distance: the later checkpoint wins.
    assert keep(cm.EveryNStepsClosest(10), infos(8, 12, 13)) == [False, True, True]
    # Python's round() sends 1.5 and 2.5 both to 2, so 15 and 25 compete for 20 and 25 wins.
    assert keep(cm.EveryNStepsClosest(10), infos(15, 25, 30)) == [False, True, True]
    # The last checkpoint is always kept, then max_to_keep trims the oldest kept ones.
    assert keep(cm.EveryNStepsClosest(10), infos(0, 4)) == [True, True]
    assert keep(cm.EveryNStepsClosest(10, max_to_keep=1), infos(0, 10, 14)) == [False, False, True]
    with pytest.raises(ValueError):
        keep(cm.EveryNStepsClosest(0), [])


def test_custom_steps():
    policy = cm.CustomSteps(steps=(s for s in [2, 4]))  # any iterable, consumed once
    assert keep(policy, infos(1, 2, 3, 4)) == [False, True, False, True]
    assert keep(policy, infos(4)) == [True]


def test_best_n_ranking_ties_and_missing_metrics():
    def ck(step, loss):
        return info(step, step, None if loss is None else {"loss": loss})

    ckpts = [ck(1, 0.5), ck(2, None), ck(3, 0.1), ck(4, 0.5), ck(5, 0.9)]
    calls = []

    def metric(m):
        calls.append(m)
        return m["loss"]

    # Default keeps the *largest* values; the metric-less checkpoint is kept on top of n.
    assert keep(cm.BestN(get_metric_fn=metric, n=2), ckpts) == [False, True, False, True, True]
    assert keep(cm.BestN(get_metric_fn=metric, n=1), [ck(1, 0.5), ck(2, 0.5)]) == [False, True]
    assert None not in calls  # never called for metrics=None
    # reverse=True keeps the smallest; tie between steps 1 and 4 at 0.5 goes to the later one.
    best_low = cm.BestN(get_metric_fn=metric, reverse=True, n=2)
    assert keep(best_low, ckpts) == [False, True, True, True, False]
    drop = cm.BestN(get_metric_fn=metric, reverse=True, n=2, keep_checkpoints_without_metrics=False)
    assert keep(drop, ckpts) == [False, False, True, True, False]
    # n=None, or n >= number of checkpoints (counting metric-less ones): keep everything.
    assert keep(cm.BestN(get_metric_fn=metric), ckpts) == [True] * 5
    all_fit = cm.BestN(get_metric_fn=metric, n=5, keep_checkpoints_without_metrics=False)
    assert keep(all_fit, ckpts) == [True] * 5
    # n=0 keeps nothing, even metric-less checkpoints.
    assert keep(cm.BestN(get_metric_fn=metric, n=0), ckpts) == [False] * 5
    # Only metric-less checkpoints and n smaller: they are kept (or not) by the flag alone.
    bare = [ck(1, None), ck(2, None)]
    assert keep(cm.BestN(get_metric_fn=metric, n=1), bare) == [True, True]
    no_bare = cm.BestN(get_metric_fn=metric, n=1, keep_checkpoints_without_metrics=False)
    assert keep(no_bare, bare) == [False, False]


def test_best_n_is_keyword_only():
    with pytest.raises(TypeError):
        cm.BestN(lambda m: 0.0)  # type: ignore[misc]
    with pytest.raises(TypeError):
        ocm.BestN(lambda m: 0.0)


def test_any_preservation_policy():
    ckpts = infos(0, 3, 5, 7, 9)
    combo = cm.AnyPreservationPolicy([cm.EveryNSteps(5), cm.LatestN(1)])
    assert keep(combo, ckpts) == [True, False, True, False, True]
    # Orbax returns a bare False (np.any over an empty array) here; ours a list of False.
    assert keep(cm.AnyPreservationPolicy([]), ckpts) == [False] * 5

    class Broken:
        def should_preserve(self, checkpoints, *, context):
            return [True]

    with pytest.raises(ValueError):
        keep(cm.AnyPreservationPolicy([Broken()]), ckpts)


def test_latest_duration(monkeypatch):
    now = BASE + datetime.timedelta(hours=1)
    monkeypatch.setattr(pp, "_utcnow", lambda: now)
    hour = datetime.timedelta(hours=1)
    ckpts = [info(1, -1), info(2, 0), info(3, 1800), info(4, 3600)]
    assert keep(cm.LatestDuration(hour), ckpts) == [False, True, True, True]  # age == duration
    assert keep(cm.LatestDuration(datetime.timedelta(0)), ckpts) == [False, False, False, True]
    # Once one checkpoint is young enough, every later one is kept regardless of its time.
    out_of_order = [info(1, 3600), info(2, -100)]
    assert keep(cm.LatestDuration(hour), out_of_order) == [True, True]
    assert keep(cm.LatestDuration(datetime.timedelta(seconds=1)), [info(1, -10)]) == [False]
    naive = [cm.CheckpointInfo(1, datetime.datetime(2024, 1, 1))]
    with pytest.raises(TypeError):  # needs timezone-aware times, like Orbax
        keep(cm.LatestDuration(hour), naive)


# ----------------------------------------------------------------------- unit tests: save decision
def test_fixed_interval_and_specific_steps():
    policy = cm.FixedIntervalPolicy(10)
    assert [policy.should_save(info(s), [], context=ctx()) for s in (0, 5, 10, 25, 30)] == [
        True,
        False,
        True,
        False,
        True,
    ]
    with pytest.raises(ZeroDivisionError):  # Orbax does not validate either
        cm.FixedIntervalPolicy(0).should_save(info(1), [], context=ctx())
    specific = cm.SpecificStepsPolicy(range(3, 9, 3))
    got = [specific.should_save(info(s), [], context=ctx(True, True)) for s in range(10)]
    assert got == [s in (3, 6) for s in range(10)]


def test_continuous_checkpointing():
    policy = cm.ContinuousCheckpointingPolicy(minimum_interval_secs=10)
    assert policy.should_save(info(1, 0), [], context=ctx()) is True
    assert policy.should_save(info(1, 0), [], context=ctx(saving=True)) is False
    prev = [info(0, 50), info(1, 0)]  # only the *last* previous step counts
    assert policy.should_save(info(2, 10), prev, context=ctx()) is True  # exactly 10 s
    assert policy.should_save(info(2, 10 - 1e-6), prev, context=ctx()) is False
    assert policy.should_save(info(2, 100), prev, context=ctx(saving=True)) is False
    unlimited = cm.ContinuousCheckpointingPolicy()
    assert unlimited.should_save(info(2, 0), [info(1, 0)], context=ctx()) is True
    assert unlimited.should_save(info(2, 0), [info(1, 0)], context=ctx(saving=True)) is False
    with pytest.raises(TypeError):  # keyword-only, as in Orbax
        cm.ContinuousCheckpointingPolicy(10)  # type: ignore[misc]


def test_preemption_and_initial_save():
    pre, init = cm.PreemptionCheckpointingPolicy(), cm.InitialSavePolicy()
    assert pre.should_save(info(3), [info(1)], context=ctx(preempt=True)) is True
    assert pre.should_save(info(3), [], context=ctx(saving=True)) is False
    assert init.should_save(info(3), [], context=ctx(saving=True)) is True
    assert init.should_save(info(3), [info(1)], context=ctx(preempt=True)) is False


def test_any_save_policy_combines_in_order_and_short_circuits():
    calls = []

    class Spy:
        def __init__(self, answer):
            self.answer = answer

        def should_save(self, step, previous_steps, *, context):
            calls.append(self.answer)
            return self.answer

    combo = cm.AnySavePolicy([cm.FixedIntervalPolicy(10), cm.PreemptionCheckpointingPolicy()])
    assert combo.should_save(info(20), [], context=ctx()) is True
    assert combo.should_save(info(7), [], context=ctx(preempt=True)) is True
    assert combo.should_save(info(7), [], context=ctx()) is False
    assert cm.AnySavePolicy([]).should_save(info(0), [], context=ctx()) is False
    assert cm.AnySavePolicy([Spy(False), Spy(True), Spy(True)]).should_save(
        info(0), [], context=ctx()
    )
    assert calls == [False, True]


# ------------------------------------------------------------------------------ types and imports
def test_contexts_and_protocols():
    c = ctx(saving=True)
    assert (c.is_saving_in_progress, c.reached_preemption, c.multiprocessing_options) == (
        True,
        False,
        None,
    )
    with pytest.raises(TypeError):
        cm.DecisionContext(True, False)  # type: ignore[misc]  # keyword-only, as in Orbax
    with pytest.raises(AttributeError):
        c.reached_preemption = True  # type: ignore[misc]
    assert cm.PreservationContext() == cm.PreservationContext()
    assert isinstance(cm.InitialSavePolicy(), cm.SaveDecisionPolicy)
    assert not isinstance(cm.LatestN(1), cm.SaveDecisionPolicy)
    assert cm.LatestN(2) == cm.LatestN(2) != cm.LatestN(3)


def test_checkpoint_info_identity_is_step_and_time():
    a = cm.CheckpointInfo(3, BASE, {"loss": 1.0})
    b = cm.CheckpointInfo(3, BASE, None)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != cm.CheckpointInfo(3, BASE + SEC)
    import numpy as np
    step = cm.CheckpointInfo(np.int64(7), BASE).step
    assert step == 7 and type(step) is int


def test_public_names_and_no_orbax_import():
    for name in [
        "DecisionContext", "SaveDecisionPolicy", "FixedIntervalPolicy", "SpecificStepsPolicy",
        "ContinuousCheckpointingPolicy", "PreemptionCheckpointingPolicy", "InitialSavePolicy",
        "AnySavePolicy", "PreservationContext", "PreservationPolicy", "LatestN", "EveryNSeconds",
        "EveryNSteps", "EveryNStepsClosest", "CustomSteps", "AnyPreservationPolicy", "BestN",
        "LatestDuration",
    ]:  # fmt: skip
        assert hasattr(ocm, name) and hasattr(cm, name), name
        assert getattr(cm, name).__doc__.strip(), name
    code = (
        "import sys; import ckpt_async.checkpoint_managers; "
        "bad = [m for m in sys.modules if m.startswith('orbax')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=_ROOT, check=True)
