"""Tests for openmoe_jax.checkpoint: round trips, retention, incomplete saves, resharding."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from openmoe_jax.training import checkpoint

DATA_STATE = {'iterator': {'shard': 3, 'offset': 12345}, 'seed': 0, 'files': ['a', 'b']}


def _state(step=7, mesh=None):
  mesh = mesh or Mesh(np.array(jax.devices()), ('data',))
  params = {
      'decoder': {'w': jax.device_put(jnp.arange(64.0).reshape(8, 8) / 7.0,
                                      NamedSharding(mesh, P('data'))),
                  'scale': jnp.linspace(-1.0, 1.0, 8).astype(jnp.bfloat16)},
  }
  opt_state = optax.adam(1e-3).init(params)
  return {'step': jnp.asarray(step, jnp.int32), 'params': params, 'opt_state': opt_state}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_data_state(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, DATA_STATE)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 7
    restored, data_state = ckpt.restore(7, _abstract(state))
  _assert_trees_equal(restored, state)
  assert restored['params']['decoder']['scale'].dtype == jnp.bfloat16
  assert int(restored['step']) == 7 and restored['step'].dtype == jnp.int32
  assert restored['params']['decoder']['w'].sharding == state['params']['decoder']['w'].sharding
  assert data_state == DATA_STATE
  assert (tmp_path / 'checkpoints' / '7' / 'state').is_dir()


def test_keeps_last_n(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in (10, 20, 30, 40):
      ckpt.save(step, state, {'step': step})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [30, 40]
    _, data_state = ckpt.restore(None, _abstract(state))
  assert data_state == {'step': 40}
  assert checkpoint.list_steps(tmp_path) == [30, 40]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['30', '40']


def test_latest_step_ignores_incomplete_checkpoints(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, state, DATA_STATE)
  root = tmp_path / 'checkpoints'
  # A crash mid-save leaves orbax's tmp dir (both naming schemes orbax has used) ...
  (root / '9.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)
  (root / '11.orbax-checkpoint-tmp-1767225600' / 'state').mkdir(parents=True)
  # ... and a final-named dir without a commit record (object store, interrupted copy).
  (root / '13' / 'state').mkdir(parents=True)
  (root / '13' / '_CHECKPOINT_METADATA').write_text('{"init_timestamp_nsecs": 1}')
  assert checkpoint.list_steps(tmp_path) == [5]
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 5
    restored, data_state = ckpt.restore(None, _abstract(state))
    with pytest.raises(FileNotFoundError):
      ckpt.restore(13, _abstract(state))
  _assert_trees_equal(restored, state)
  assert data_state == DATA_STATE


def test_failed_save_leaves_existing_checkpoint_intact(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, DATA_STATE)
    ckpt.wait_until_finished()
    with pytest.raises(ValueError, match='Unsupported type'):
      ckpt.save(2, dict(state, bad=object()), DATA_STATE)
      ckpt.wait_until_finished()
    with pytest.raises(ocp.checkpoint_manager.StepAlreadyExistsError):
      ckpt.save(1, _state(step=99), {'other': 1}, force=True)
    assert not ckpt.save(1, _state(step=99), {'other': 1})  # never overwrites
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 1
    restored, data_state = ckpt.restore(1, _abstract(state))
    assert ckpt.save(3, state, {'after': 'failure'})
  _assert_trees_equal(restored, state)
  assert data_state == DATA_STATE
  assert checkpoint.list_steps(tmp_path) == [1, 3]


def test_restore_onto_a_different_mesh(tmp_path):
  state = _state(mesh=Mesh(np.array(jax.devices()), ('data',)))
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state, DATA_STATE)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
  target = _abstract(state)
  new_sharding = NamedSharding(mesh, P('model', 'data'))
  target['params']['decoder']['w'] = jax.ShapeDtypeStruct((8, 8), jnp.float32,
                                                          sharding=new_sharding)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    restored, _ = ckpt.restore(3, target)
  w = restored['params']['decoder']['w']
  assert w.sharding == new_sharding
  assert w.addressable_shards[0].data.shape == (2, 4)
  np.testing.assert_array_equal(np.asarray(w), np.asarray(state['params']['decoder']['w']))


def test_restore_params_without_optimizer_structure(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(4, state, DATA_STATE)
    ckpt.save(8, jax.tree.map(lambda x: x + 1, state), DATA_STATE)
  params = checkpoint.restore_params(tmp_path)  # latest: step 8
  assert set(params) == {'decoder'} and set(params['decoder']) == {'w', 'scale'}
  assert isinstance(params['decoder']['w'], np.ndarray)
  assert params['decoder']['scale'].dtype == jnp.bfloat16
  expected = jax.tree.map(lambda x: np.asarray(x + 1), state['params'])
  _assert_trees_equal(params, expected)
  _assert_trees_equal(checkpoint.restore_params(tmp_path, step=4),
                      jax.tree.map(np.asarray, state['params']))
  with pytest.raises(FileNotFoundError):
    checkpoint.restore_params(tmp_path, step=5)
  with pytest.raises(KeyError):
    checkpoint.restore_params(tmp_path, params_key='target')


def test_relative_model_dir_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = {'w': jnp.arange(4.0)}
  with checkpoint.Checkpointer('rel_run', async_save=True) as ck:
    ck.save(1, state, {'n': 1}, force=True)
    ck.wait_until_finished()
  assert checkpoint.list_steps('rel_run') == [1]
  assert checkpoint.checkpoint_dir('rel_run').is_absolute()
