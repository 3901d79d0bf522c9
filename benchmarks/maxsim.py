"""MaxSim throughput on this machine: ours (jitted einsum, chunked) vs naive PyTorch.

  python benchmarks/maxsim.py [--quick] [--tile_bytes 2097152]

Counts 2*B*N*Lq*Ld*dim FLOPs per call and reports GFLOP/s, (query, document)
pairs scored per second, the ratio to PyTorch, and the fraction of a plain
2048^3 fp32 matmul's GFLOP/s measured in the same run (the practical limit).
Timings are the median of several repeats after a warm-up call.
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from preflmr_jax.late_interaction import (  # noqa: E402
    chunk_sizes, default_tile_bytes, maxsim, maxsim_chunked)

N_DOCS, DOC_LEN, DIM = 1000, 180, 128


def median_seconds(fn, repeats):
  """Median wall time of fn() after one warm-up call (which also compiles)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def torch_maxsim(Q, D, D_mask):
  """The naive formulation: full [B, Lq, N, Ld] token scores, mask, max, sum."""
  s = torch.einsum("bqd,nld->bqnl", Q, D)
  s.masked_fill_(~D_mask[None, None], float("-inf"))
  return s.max(-1).values.sum(1)


def make_inputs(b, lq, seed=0):
  """Unit-norm fp32 tokens; documents have random lengths in [32, DOC_LEN]."""
  rng = np.random.default_rng(seed)
  Q = rng.normal(size=(b, lq, DIM)).astype(np.float32)
  D = rng.normal(size=(N_DOCS, DOC_LEN, DIM)).astype(np.float32)
  Q /= np.linalg.norm(Q, axis=-1, keepdims=True)
  D /= np.linalg.norm(D, axis=-1, keepdims=True)
  lengths = rng.integers(32, DOC_LEN + 1, size=N_DOCS)
  D_mask = np.arange(DOC_LEN)[None] < lengths[:, None]
  D *= D_mask[..., None]  # padded document tokens are zeros, as the encoder emits
  return Q, D, D_mask


def matmul_gflops(repeats):
  """Best of jnp and torch on a 2048^3 fp32 matmul: this machine's practical peak."""
  a = np.random.default_rng(0).normal(size=(2048, 2048)).astype(np.float32)
  flops = 2 * 2048**3
  ja = jnp.asarray(a)
  jmm = jax.jit(lambda x: x @ x)
  ta = torch.from_numpy(a)
  tj = median_seconds(lambda: jmm(ja).block_until_ready(), repeats)
  tt = median_seconds(lambda: ta @ ta, repeats)
  return flops / tj / 1e9, flops / tt / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="Lq=32 only, fewer repeats (< 30 s)")
  parser.add_argument("--tile_bytes", type=int, help="maxsim_chunked's score-tile budget "
                      "(default late_interaction.default_tile_bytes())")
  args = parser.parse_args()
  repeats = 3 if args.quick else 7
  shapes = [(1, 32), (8, 32)] if args.quick else [(1, 32), (8, 32), (1, 320), (8, 320)]

  print(f"python {platform.python_version()}  jax {jax.__version__}  "
        f"numpy {np.__version__}  torch {torch.__version__}")
  print(f"jax devices: {jax.devices()}  cpus: {os.cpu_count()}  "
        f"torch threads: {torch.get_num_threads()}  machine: {platform.processor() or platform.machine()}")
  mm_jax, mm_torch = matmul_gflops(repeats)
  limit = max(mm_jax, mm_torch)
  print(f"fp32 matmul 2048^3: jnp {mm_jax:.1f} GFLOP/s, torch {mm_torch:.1f} GFLOP/s "
        f"(limit = {limit:.1f})")
  print(f"documents: N={N_DOCS} x Ld={DOC_LEN} x dim={DIM}, fp32, median of {repeats}\n")

  header = (f"{'B':>2} {'Lq':>4}  {'method':<24} {'ms':>8} {'GFLOP/s':>8} "
            f"{'pairs/s':>10} {'vs torch':>8} {'of limit':>8} {'max|diff|':>9}")
  print(header)
  print("-" * len(header))
  for b, lq in shapes:
    Q, D, D_mask = make_inputs(b, lq)
    flops = 2 * b * N_DOCS * lq * DOC_LEN * DIM
    jq, jd, jm = jnp.asarray(Q), jnp.asarray(D), jnp.asarray(D_mask)
    tq, td, tm = torch.from_numpy(Q), torch.from_numpy(D), torch.from_numpy(D_mask)
    with torch.inference_mode():
      ref = torch_maxsim(tq, td, tm).numpy()
      t_torch = median_seconds(lambda: torch_maxsim(tq, td, tm), repeats)
    tile = args.tile_bytes or default_tile_bytes()
    chunk, qc = chunk_sizes(b, lq, N_DOCS, DOC_LEN, tile)
    methods = [
        ("maxsim", lambda: maxsim(jq, jd, jm)),
        (f"maxsim_chunked({chunk},{qc})", lambda: maxsim_chunked(jq, jd, jm, tile_bytes=tile)),
    ]
    rows = [(name, median_seconds(lambda: fn().block_until_ready(), repeats),
             float(np.abs(np.asarray(fn()) - ref).max())) for name, fn in methods]
    rows.append(("torch naive einsum", t_torch, 0.0))
    for name, t, diff in rows:
      gflops = flops / t / 1e9
      print(f"{b:>2} {lq:>4}  {name:<24} {t * 1e3:>8.1f} {gflops:>8.1f} "
            f"{b * N_DOCS / t:>10.3g} {t_torch / t:>7.2f}x {gflops / limit:>8.0%} {diff:>9.1e}")


if __name__ == "__main__":
  main()
