"""pytest plugin for the GPU check (``-p pytest_shard``): run a slice of a test file, or its GPU tests only.

``--shard=I/N`` keeps every N-th collected test, starting at the I-th: the check runs a file in N
processes side by side (Triton compiles kernels on one core per process; the GPU machine has 16).
Round-robin over the collection order spreads each parametrised test's cases, and with them the kernel
variants to compile, across the shards.

``--cuda-only`` keeps the tests that need a GPU: marked ``skipif`` with a reason naming CUDA (the
suite's ``requires_cuda``), or with "cuda"/"gpu" in their id. The CPU tests of a file run in CI anyway.
"""


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, help="I/N: run only the tests at positions I, I+N, I+2N, ...")
    parser.addoption("--cuda-only", action="store_true", help="run only the tests that need a CUDA GPU")


def _needs_cuda(item) -> bool:
    nodeid = item.nodeid.lower()
    if "cuda" in nodeid or "gpu" in nodeid:
        return True
    return any("CUDA" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if _needs_cuda(item)] if config.getoption("--cuda-only") else list(items)
    spec = config.getoption("--shard")
    if spec:
        index, count = (int(x) for x in spec.split("/"))
        if not 0 <= index < count:
            raise ValueError(f"--shard={spec}: I must be in [0, N)")
        keep = [item for i, item in enumerate(keep) if i % count == index]
    kept = set(map(id, keep))
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = keep
