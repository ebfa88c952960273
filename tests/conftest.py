import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

# tests/multidevice needs 8 virtual devices, which jax fixes at start-up: tests/test_multidevice.py
# runs them in a subprocess with XLA_FLAGS set (MOEX_MULTIDEVICE=1); here they are not collected.
collect_ignore = [] if os.environ.get("MOEX_MULTIDEVICE") else ["multidevice"]


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """hf_model(name) -> folder with a tiny random transformers model (saved once per session)."""
    from tests.hf_models import save
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = save(name, tmp_path_factory.mktemp(f"hf-{name}"))
        return cache[name]
    return get


@pytest.fixture(scope="session")
def converted(hf_model, tmp_path_factory):
    """converted(name, dtype='fp32') -> moex checkpoint folder of hf_model(name)."""
    from checkpoints_convert.convert import convert
    cache = {}

    def get(name, dtype="fp32"):
        if (name, dtype) not in cache:
            out = tmp_path_factory.mktemp(f"moex-{name}-{dtype}") / "ckpt"
            cache[name, dtype] = convert(hf_model(name), out, dtype, progress=False)
        return cache[name, dtype]
    return get


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_code():
    """Drop compiled executables after each test module. Every XLA CPU executable keeps memory
    maps open, and one process running the whole suite would otherwise pass the kernel's
    vm.max_map_count (65530) and crash inside the compiler."""
    yield
    import gc
    jax.clear_caches()
    gc.collect()
