"""Checkpoints: round trip with optimizer/RNG/data state, rotation, a real crash mid-save, sharded restore,
and the saved-model folder format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemmax.models.gemma.config import tiny_config
from gemmax.train.checkpoint import CheckpointError, CheckpointManager, abstract_tree, load_params, save_params
from gemmax.train.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def _params(seed: int = 0):
    r = np.random.default_rng(seed)
    return {
        "token_embedding": {"embeddings": jnp.asarray(r.normal(size=(8, 4)), jnp.float32)},
        "decoder_block": {"pre_ffw_norm": {"scale": jnp.asarray(r.normal(size=(2, 4)), jnp.bfloat16)},
                          "ffw_linear": {"kernel": jnp.asarray(r.normal(size=(2, 6, 4)), jnp.float32)}},
    }


def _assert_tree_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_exact_resume_state(tmp_path):
    params = _params()
    tx = make_optimizer(1e-2, schedule="constant", frozen=r"embeddings$")
    opt_state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    key = jax.random.key(42)
    with CheckpointManager(tmp_path / "ck", keep=3) as mgr:
        assert mgr.latest_step() is None
        assert mgr.save(10, params=params, opt_state=opt_state, rng=key, data_state={"epoch": 1, "batch": 7,
                        "seed": 0}, metrics={"loss": jnp.float32(2.5)}, extra={"note": "x"})
        mgr.wait_until_finished()
        assert mgr.latest_step() == 10
        out = mgr.restore(target={"params": params, "opt_state": opt_state})
    _assert_tree_equal(out["params"], params)
    _assert_tree_equal(out["opt_state"], opt_state)  # same optax structure (named tuples) back
    assert type(out["opt_state"]) is type(opt_state)
    assert jnp.array_equal(jax.random.key_data(out["rng"]), jax.random.key_data(key))
    assert out["data_state"] == {"epoch": 1, "batch": 7, "seed": 0}
    assert out["metrics"] == {"loss": 2.5} and out["extra"] == {"note": "x"} and out["step"] == 10
    # a new manager on the same folder (a new process after a restart) sees it too; no target -> plain dicts
    with CheckpointManager(tmp_path / "ck") as mgr:
        raw = mgr.restore()
        np.testing.assert_array_equal(raw["params"]["token_embedding"]["embeddings"],
                                      params["token_embedding"]["embeddings"])
        with pytest.raises(CheckpointError, match="no checkpoint for step 3"):
            mgr.restore(3)
        with pytest.raises(CheckpointError, match="target lacks"):
            mgr.restore(target={"params": params})


def test_keep_last_n_and_interval(tmp_path):
    with CheckpointManager(tmp_path, keep=2, save_interval_steps=5, async_save=False) as mgr:
        saved = [s for s in range(0, 21) if mgr.save(s, params={"w": jnp.full((2,), float(s))})]
        assert saved == [0, 5, 10, 15, 20]
        assert mgr.save(21, params={"w": jnp.full((2,), 21.0)}, force=True)
        assert mgr.all_steps() == [20, 21]
        assert float(mgr.restore(20)["params"]["w"][0]) == 20.0
    with CheckpointManager(tmp_path / "empty") as mgr:
        with pytest.raises(CheckpointError, match="no checkpoint to restore"):
            mgr.restore()


_CRASH_CHILD = textwrap.dedent("""
    import sys, numpy as np
    from gemmax.train.checkpoint import CheckpointManager
    mgr = CheckpointManager(sys.argv[1], keep=3, async_save={async_save})
    mgr.save(1, params={{"w": np.full((4,), 1.0, np.float32)}}, data_state={{"epoch": 0, "batch": 1}})
    mgr.wait_until_finished()
    print("step1", flush=True)
    big = {{f"w{{i}}": np.full((1024, 1024), float(i), np.float32) for i in range(64)}}
    big["w"] = np.full((4,), 2.0, np.float32)
    mgr.save(2, params=big, data_state={{"epoch": 0, "batch": 2}})
    mgr.wait_until_finished()
    print("step2", flush=True)
""")


@pytest.mark.parametrize("async_save", [False, True])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, async_save):
    """SIGKILL a process while it writes step 2: step 1 must still restore, and saving resumes cleanly."""
    ck = tmp_path / "ck"
    script = tmp_path / "child.py"
    script.write_text(_CRASH_CHILD.format(async_save=async_save))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(script), str(ck)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "step1"
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until step 2's temporary folder exists, then kill
            if any(p.name.startswith("2.") and "tmp" in p.name for p in ck.iterdir()):
                break
            time.sleep(0.005)
        else:
            pytest.fail("the child never started writing step 2")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (ck / "2").exists(), "save finished before the kill; the test did not interrupt it"
    with CheckpointManager(ck, keep=3) as mgr:
        assert mgr.latest_step() == 1 and mgr.all_steps() == [1]
        out = mgr.restore()
        np.testing.assert_array_equal(out["params"]["w"], np.full((4,), 1.0, np.float32))
        assert out["data_state"] == {"epoch": 0, "batch": 1}
        # the leftover temporary folder is gone and step 2 can be written again
        assert not any("tmp" in p.name for p in ck.iterdir())
        mgr.save(2, params={"w": np.full((4,), 3.0, np.float32)})
        mgr.wait_until_finished()
        assert mgr.latest_step() == 2


def test_sharded_save_restore_single_device(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    sh = NamedSharding(mesh, P("model", None))
    params = jax.tree_util.tree_map(lambda x: jax.device_put(x, sh) if x.ndim == 2 else x, _params())
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(1, params=params)
        target = {"params": abstract_tree(params)}
        out = mgr.restore(target=target)
    emb = out["params"]["token_embedding"]["embeddings"]
    assert emb.sharding == sh
    np.testing.assert_array_equal(emb, params["token_embedding"]["embeddings"])


_SHARDED_CHILD = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from gemmax.train.checkpoint import CheckpointManager, abstract_tree
    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    w = jnp.arange(8 * 8, dtype=jnp.float32).reshape(8, 8)
    saved = jax.device_put(w, NamedSharding(mesh, P("model", "data")))
    with CheckpointManager(sys.argv[1], async_save=False) as mgr:
        mgr.save(5, params={"w": saved})
    # restore into a different layout, as a resumed job on another mesh shape would
    mesh2 = Mesh(np.array(jax.devices()).reshape(4, 1), ("model", "data"))
    want = NamedSharding(mesh2, P(None, "model"))
    with CheckpointManager(sys.argv[1]) as mgr:
        out = mgr.restore(target={"params": {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=want)}})
    got = out["params"]["w"]
    assert got.sharding == want, got.sharding
    assert len(got.addressable_shards) == 4 and got.addressable_shards[0].data.shape == (8, 2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
    print("ok")
""")


def test_sharded_save_restore_across_meshes(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_SHARDED_CHILD)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "ck")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# ---- saved-model folders --------------------------------------------------------------------------


def test_save_and_load_params(tmp_path):
    cfg = tiny_config("gemma2")
    params = _params()
    folder = save_params(tmp_path / "model", params, cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "gemmax_params.json", "weights"]
    assert json.loads((folder / "config.json").read_text())["family"] == "gemma2"
    loaded, cfg2 = load_params(folder)
    assert cfg2 == cfg
    _assert_tree_equal(loaded, params)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(folder, params, cfg)
    p2 = _params(1)
    save_params(folder, p2, cfg, overwrite=True)
    _assert_tree_equal(load_params(folder)[0], p2)
    as_bf16, _ = load_params(folder, dtype=jnp.bfloat16)
    assert as_bf16["token_embedding"]["embeddings"].dtype == jnp.bfloat16
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1), ("model",))
    target = abstract_tree(p2, NamedSharding(mesh, P()))
    sharded, _ = load_params(folder, target=target)
    assert sharded["token_embedding"]["embeddings"].sharding == NamedSharding(mesh, P())


def test_load_params_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_params(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_params(tmp_path / "empty")
    folder = save_params(tmp_path / "m", _params(), tiny_config("gemma"))
    (folder / "config.json").write_text('{"family": "gemma", "bogus": 1}')
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_params(folder)
    folder = save_params(tmp_path / "m2", _params(), tiny_config("gemma"))
    (folder / "gemmax_params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        load_params(folder)
    folder = save_params(tmp_path / "m3", _params(), tiny_config("gemma"))
    for f in (folder / "weights").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="weights are missing or corrupt"):
        load_params(folder)
    with pytest.raises(CheckpointError, match="does not match"):
        load_params(save_params(tmp_path / "m4", _params(), tiny_config("gemma")), target={"x": params_sds()})


def params_sds():
    return jax.ShapeDtypeStruct((2,), jnp.float32)
