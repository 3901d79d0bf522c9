"""Rewrites the XLA GPU dumps in this folder (tests/test_gpu_launches.py) with jax's CUDA plugin.

  python tests/golden/gpu_dump/make.py   # in the plan's GPU environment: requirements-gpu-plan.txt
"""

import glob
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp

from preflmr_jax.tools import gpu_launches, plan

KEEP = ("thunk_sequence.txt", "thunk_sequence_after_thunk_passes.txt", "thunk_metadata.txt",
        "gpu_after_optimizations.txt")


def scan(x, ws):
  """A 3-step scan of seven kernels (enough for XLA to record them into a CUDA graph) stacking
  one output, then seven kernels."""
  def layer(c, w):
    h = c @ w
    h = jnp.tanh(h) * jax.nn.sigmoid(h.sum(0))
    h = h / jnp.sqrt((h * h).sum(-1, keepdims=True) + 1.0)
    h = h - jnp.exp(h.max(0)) @ w
    return h @ w.T + c, h  # the second output is stacked: written into [3, 64, 64]

  c, ys = jax.lax.scan(layer, x, ws)
  a, b = jnp.sin(c).sum(0), jnp.cos(ys).max(0)
  return jnp.log1p(jnp.abs(b)) @ jnp.exp(c.T @ a) + jnp.sort(a) * jnp.tanh(c.mean())


def nested(x, ws, p):
  """A 2-step scan of a 3-step scan, then a conditional: too few kernels for a CUDA graph."""
  def outer(c, w):
    return jax.lax.scan(lambda c, v: (jnp.tanh(c @ v) + c, None), c, w)[0], None

  c = jax.lax.scan(outer, x, ws)[0]
  return jax.lax.cond(p > 0, lambda c: jnp.sin(c) @ c, lambda c: jnp.cos(c).T, c)


def main():
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_enable_compilation_cache", False)  # a cached program writes no dump
  gpu = jax.sharding.SingleDeviceSharding(plan.topology_devices("h100:1")[0])
  spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=gpu)
  here = os.path.dirname(os.path.abspath(__file__))
  for fn, args in ((scan, (spec(64, 64), spec(3, 64, 64))),
                   (nested, (spec(64, 64), spec(2, 3, 64, 64), spec(dtype=jnp.int32)))):
    out = os.path.join(here, fn.__name__)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with tempfile.TemporaryDirectory() as dump:
      jax.jit(fn).lower(*args).compile(gpu_launches.dump_options(dump))
      for path in glob.glob(os.path.join(dump, "*")):
        if path.endswith(KEEP):
          shutil.copy(path, out)
    gpu_launches.read(out)  # the dump is complete and reads


if __name__ == "__main__":
  main()
