"""Rewrites this folder's XLA GPU dump (tests/test_gpu_launches.py), with jax's CUDA plugin:

  python tests/golden/gpu_dump/make.py    # in the plan's GPU environment (requirements-gpu-plan.txt)
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


def f(x, ws):
  def layer(c, w):  # seven kernels: enough for XLA to record them into a CUDA graph
    h = c @ w
    h = jnp.tanh(h) * jax.nn.sigmoid(h.sum(0))
    h = h / jnp.sqrt((h * h).sum(-1, keepdims=True) + 1.0)
    h = h - jnp.exp(h.max(0)) @ w
    return h @ w.T + c, h  # the second output is stacked: written into [3, 64, 64]

  c, ys = jax.lax.scan(layer, x, ws)
  a, b = jnp.sin(c).sum(0), jnp.cos(ys).max(0)
  return jnp.log1p(jnp.abs(b)) @ jnp.exp(c.T @ a) + jnp.sort(a) * jnp.tanh(c.mean())


def main():
  jax.config.update("jax_platforms", "cpu")
  gpu = jax.sharding.SingleDeviceSharding(plan.topology_devices("h100:1")[0])
  shapes = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=gpu) for s in ((64, 64), (3, 64, 64))]
  here = os.path.dirname(os.path.abspath(__file__))
  with tempfile.TemporaryDirectory() as dump:
    jax.jit(f).lower(*shapes).compile(gpu_launches.dump_options(dump))
    for path in glob.glob(os.path.join(dump, "*")):
      if path.endswith(KEEP):
        shutil.copy(path, here)


if __name__ == "__main__":
  main()
