"""pytest plugin: ``-p pytest_shard --shard=I/N`` keeps every N-th collected test, starting at the I-th.

The GPU check runs a test file in N processes side by side (Triton compiles kernels on one core per
process; the GPU machine has 16). Round-robin over the collection order spreads each parametrised test's
cases, and with them the kernel variants to compile, across the shards.
"""


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, help="I/N: run only the tests at positions I, I+N, I+2N, ...")


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    index, count = (int(x) for x in spec.split("/"))
    if not 0 <= index < count:
        raise ValueError(f"--shard={spec}: I must be in [0, N)")
    keep = [item for i, item in enumerate(items) if i % count == index]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
    items[:] = keep
