"""Step and root metadata, and the metadata objects, side by side with Orbax 0.12.8.

Scenarios of Orbax's metadata unit tests (``_src/metadata/checkpoint_test.py``,
``sharding_test.py``) run through the public API of both libraries, on documents both
write and on those older Orbax versions wrote.
"""

from __future__ import annotations

import json

import numpy as np
import orbax.checkpoint as orbax
import pytest

import ckpt_async as ca

LIBS = [pytest.param(orbax, id="orbax"), pytest.param(ca, id="ckpt_async")]


def _orbax_step(tmp_path, name="run"):
    """A manager directory of one step (0), written by Orbax; its step document."""
    d = tmp_path / name
    with orbax.CheckpointManager(d) as m:
        m.save(0, args=orbax.args.StandardSave({"a": np.arange(4)}))
        m.wait_until_finished()
    return d, json.loads((d / "0" / "_CHECKPOINT_METADATA").read_text())


# What Orbax 0.10 and 0.11 wrote into _CHECKPOINT_METADATA, for keys 0.12 renamed or dropped
# (`custom`, `format`, `item_metadata`), and fields given as null
_OLDER_STEP_DOCUMENTS = {
    "orbax_0.11.5": lambda doc: {**{k: v for k, v in doc.items() if k != "custom_metadata"},
                                 "custom": {"run": "abc"}},
    "orbax_0.10": lambda doc: {**{k: v for k, v in doc.items() if k != "custom_metadata"},
                               "format": None, "item_metadata": {"default": None},
                               "custom": {}},
    "null_fields": lambda doc: {**doc, "metrics": None, "performance_metrics": None,
                                "custom_metadata": None},
}


@pytest.mark.parametrize("variant", sorted(_OLDER_STEP_DOCUMENTS))
def test_a_step_document_of_older_orbax_reads_as_orbax_reads_it(tmp_path, variant):
    # Orbax 0.12 puts the keys it does not know into custom_metadata (its "backwards
    # compatibility"), and takes null metrics as none; ckpt_async dropped the keys
    # (custom_metadata came back {}) and refused the nulls as damage
    d, doc = _orbax_step(tmp_path)
    (d / "0" / "_CHECKPOINT_METADATA").write_text(json.dumps(
        _OLDER_STEP_DOCUMENTS[variant](doc)))

    def read(lib):
        with lib.CheckpointManager(d) as m:
            meta = m.metadata(0)
            restored = m.restore(0, args=lib.args.StandardRestore())
            steps = m.all_steps()
        direct = lib.metadata.get_step_metadata(d / "0")
        return (meta.custom_metadata, meta.metrics, meta.init_timestamp_nsecs,
                direct.custom_metadata, direct.metrics, steps, restored["a"].tolist())

    ours, theirs = read(ca), read(orbax)
    assert ours == theirs
    if variant == "orbax_0.11.5":
        assert ours[0] == {"custom": {"run": "abc"}}


def test_unknown_keys_beside_custom_metadata_are_left_out(tmp_path, caplog):
    # (Orbax refuses such a document everywhere, all_steps() included, with a ValueError;
    # ckpt_async keeps custom_metadata, leaves the keys out and says so: see migration.md)
    d, doc = _orbax_step(tmp_path)
    path = d / "0" / "_CHECKPOINT_METADATA"
    path.write_text(json.dumps({**doc, "custom_metadata": {"a": 1}, "blah": 2}))
    with pytest.raises(ValueError, match="unknown key blah"):
        with orbax.CheckpointManager(d) as m:
            m.all_steps()
    with ca.CheckpointManager(d) as m:
        assert m.all_steps() == [0]
        assert m.metadata(0).custom_metadata == {"a": 1}
        assert m.restore(0)["a"].tolist() == [0, 1, 2, 3]
    assert "blah" in caplog.text and str(path) in caplog.text


# _ROOT_METADATA as Orbax 0.10 ({"format": ..., "custom": ...}), 0.11.0 (only what was set:
# {} without metadata) and 0.11.1-0.11.8 ({"custom": ...}) wrote it, and with a null field
_OLDER_ROOT_DOCUMENTS = {
    "orbax_0.10": {"format": None, "custom": {"run": "abc"}},
    "orbax_0.11.0": {},
    "orbax_0.11.5": {"custom": {"run": "abc"}},
    "null_custom_metadata": {"internal_metadata": None, "custom_metadata": None},
}


@pytest.mark.parametrize("variant", sorted(_OLDER_ROOT_DOCUMENTS))
def test_a_root_document_of_older_orbax_reads_as_orbax_reads_it(tmp_path, variant):
    # Orbax 0.12 puts the keys it does not know into custom_metadata, and gives {} for none;
    # ckpt_async gave custom_metadata=None for each of these
    def read(lib):
        d = tmp_path / lib.__name__
        (d / "metadata").mkdir(parents=True)
        (d / "metadata" / "_ROOT_METADATA").write_text(json.dumps(
            _OLDER_ROOT_DOCUMENTS[variant]))
        with lib.CheckpointManager(d) as m:
            first = m.metadata().custom_metadata
        # (written once: a later manager's metadata= does not replace it)
        with lib.CheckpointManager(d, metadata={"run": "new"}) as m:
            m.save(0, args=lib.args.StandardSave({"a": np.arange(3)}))
            m.wait_until_finished()
            second = m.metadata().custom_metadata
        return first, second, json.loads((d / "metadata" / "_ROOT_METADATA").read_text())

    ours, theirs = read(ca), read(orbax)
    assert ours == theirs
    assert isinstance(ours[0], dict)


@pytest.mark.parametrize("axis_types", [None, "explicit"])
def test_named_sharding_metadata_made_by_hand_serializes_as_orbax_s(axis_types):
    # Orbax's sharding_test makes one with shape=np.array([1]) and axis_names=['x']:
    # to_serialized_string() raised TypeError (np.int64 is not JSON), and the text put
    # partition_spec before axis_types
    import jax

    types = None if axis_types is None else (jax.sharding.AxisType.Explicit,)

    def made(lib):
        m = lib.metadata.NamedShardingMetadata(shape=np.array([1]), axis_names=["x"],
                                               partition_spec=(None,), axis_types=types)
        text = m.to_serialized_string()
        back = lib.metadata.NamedShardingMetadata.from_deserialized_dict(json.loads(text))
        return text, back == m, list(m.shape), list(m.axis_names)

    ours, theirs = made(ca), made(orbax)
    assert ours == theirs
    if axis_types is None:
        assert ours[0] == ('{"sharding_type": "NamedSharding", "shape": [1], "axis_names": '
                           '["x"], "partition_spec": [null]}')


def test_single_device_sharding_metadata_of_jax_s_older_cpu_name_is_the_same_device():
    # (checkpoints saved on CPU with older jax name the device TFRT_CPU_0: Orbax's compares
    # equal to cpu:0, as the sharding it gives back is on cpu:0; ckpt_async's compared unequal)
    import jax

    def compare(lib):
        old = lib.metadata.SingleDeviceShardingMetadata(device_str="TFRT_CPU_0")
        now = lib.metadata.SingleDeviceShardingMetadata.from_jax_sharding(
            jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0]))
        other = lib.metadata.SingleDeviceShardingMetadata(device_str="cpu:1")
        return (now.device_str, old == now, now == old, old == other,
                old.to_jax_sharding() == now.to_jax_sharding(), old.to_serialized_string())

    ours = compare(ca)
    assert ours == compare(orbax) == ("cpu:0", True, True, False, True,
                                      '{"sharding_type": "SingleDeviceSharding", '
                                      '"device_str": "TFRT_CPU_0"}')
    assert len({ca.metadata.SingleDeviceShardingMetadata("TFRT_CPU_0"),
                ca.metadata.SingleDeviceShardingMetadata("cpu:0")}) == 1


def test_metadata_objects_made_without_arguments_are_orbax_s():
    # (RootMetadata() had custom_metadata=None where Orbax's has {})
    assert ca.metadata.RootMetadata().custom_metadata == {}
    assert orbax.metadata.RootMetadata().custom_metadata == {}
    ours, theirs = ca.metadata.StepMetadata(), orbax.metadata.StepMetadata()
    for name in ("item_handlers", "item_metadata", "metrics", "init_timestamp_nsecs",
                 "commit_timestamp_nsecs", "custom_metadata"):
        assert getattr(ours, name) == getattr(theirs, name), name
