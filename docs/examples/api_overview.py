"""Orbax's "API Overview", cell by cell, run with ``import ckpt_async as ocp``.

Each notebook cell whose value the notebook displays is printed here. ``tests/test_api_overview.py``
runs this script and the same script against orbax-checkpoint, and compares the output.
Run it: ``python docs/examples/api_overview.py``.
"""
import ckpt_async as ocp
from ckpt_async.checkpoint_managers import preservation_policy as preservation_policy_lib
from ckpt_async.checkpoint_managers import save_decision_policy as save_decision_policy_lib
import jax
import numpy as np
from jax import numpy as jnp

path = ocp.test_utils.erase_and_create_empty('/tmp/my-checkpoints/')
state = {'layer0': {'bias': np.ones((4,)), 'weight': jnp.arange(16)}}
abstract_state = jax.tree.map(ocp.tree.to_shape_dtype_struct, state)
metadata = {'version': 1.0}
extra_metadata = {'version': 1.0, 'step': 0}
directory = ocp.test_utils.erase_and_create_empty('/tmp/checkpoint-manager-single/')
options = ocp.CheckpointManagerOptions(
    save_decision_policy=save_decision_policy_lib.FixedIntervalPolicy(2),
    preservation_policy=preservation_policy_lib.LatestN(2),
)
mngr = ocp.CheckpointManager(directory, options=options)
def train_step(state):
  return jax.tree_util.tree_map(lambda x: x + 1, state)
for step in range(5):
  state = train_step(state)
  mngr.save(step, args=ocp.args.StandardSave(state))
mngr.wait_until_finished()
print(mngr.latest_step())
print(mngr.all_steps())
print(mngr.restore(mngr.latest_step()))
def set_dtype(abstract_arr):
  return abstract_arr.update(dtype=np.float32)
print(mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(jax.tree.map(set_dtype, abstract_state))))
directory = ocp.test_utils.erase_and_create_empty('/tmp/checkpoint-manager-multiple/')
mngr = ocp.CheckpointManager(directory, options=options)
def train_step(step, _state, _extra_metadata):
  return jax.tree_util.tree_map(lambda x: x + 1, _state), {**_extra_metadata, **{'step': step}}
for step in range(5):
  state, extra_metadata = train_step(step, state, extra_metadata)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra_metadata=ocp.args.JsonSave(extra_metadata)))
mngr.wait_until_finished()
result = mngr.restore(mngr.latest_step())
print(result)
print(result.state)
print(result.extra_metadata)
print(mngr.restore(mngr.latest_step(), args=ocp.args.Composite(extra_metadata=None)))
print(mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(jax.tree.map(set_dtype, abstract_state)), extra_metadata=None)))
with ocp.StandardCheckpointer() as ckptr:
  ckptr.save(path / 'standard-ckpt-1', state)
  result = ckptr.restore(path / 'standard-ckpt-1', abstract_state)
  print(result)
with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
  ckptr.save(path / 'standard-ckpt-2', args=ocp.args.StandardSave(state))
with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
  ckptr.save(path / 'json-ckpt-1', args=ocp.args.JsonSave({'a': 'b'}))
ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
  ckptr.save(path / 'composite-ckpt-1', args=ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)))
directory = ocp.test_utils.erase_and_create_empty('/tmp/checkpoint-manager-items-1/')
mngr = ocp.CheckpointManager(directory)
mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra_metadata=ocp.args.JsonSave(extra_metadata)))
restored = mngr.restore(0)
print(restored.state)
print(restored.extra_metadata)
mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra_metadata=None))
restored = mngr.restore(1)
print(restored.state)
print(restored.extra_metadata)
meta = mngr.item_metadata(1)
print(meta.state)
mngr.close()
with ocp.CheckpointManager(directory) as mngr:
  try:
    print(mngr.restore(0))
  except BaseException as e:
    print(e)
  print('')
  print(mngr.item_metadata(0))
registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
registry.add('state', ocp.args.StandardSave)
registry.add('state', ocp.args.StandardRestore)
with ocp.CheckpointManager(directory, handler_registry=registry) as mngr:
  print(mngr.restore(0, args=ocp.args.Composite(state=None)))
  print('')
  print(mngr.item_metadata(0))
with ocp.CheckpointManager(directory, handler_registry=registry) as mngr:
  mngr.save(2, args=ocp.args.PyTreeSave({'a': 'b'}))
  try:
    print(mngr.save(3, args=ocp.args.JsonSave({'a': 'b'})))
  except BaseException as e:
    print(e)
