"""Test setup: every test sees 8 simulated CPU devices (set before JAX initialises), and the SAMPLE
M2KR task that the tiny config trains on is written and built once per session in a temporary cache
(never the user's ~/.cache), which also holds XLA's compilation cache."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_CACHE = tempfile.TemporaryDirectory(prefix="preflmr_jax_test_cache_")
os.environ["XDG_CACHE_HOME"] = _CACHE.name  # subprocesses (python -m ...) inherit it
# Many tests compile the same tiny train step, in this process and in subprocesses: XLA's persistent
# cache compiles each program once per session.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_CACHE.name, "jax_compilation_cache")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, jax.devices()


@pytest.fixture
def one_device_env():
  """The environment for a subprocess that runs on one CPU device: end-to-end runs compile quicker
  than on the 8 simulated ones."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
  return env
