import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import harden.cli.openmp  # noqa: E402,F401  (before torch: idle OpenMP threads sleep, as under the `harden` command)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """A tiny SD-v1-topology pipeline (32x32 latents), shared read-only across tests."""
    from harden.tiny import tiny_pipeline

    return tiny_pipeline(seed=0, sample_size=32)


@pytest.fixture(scope="session")
def planted():
    """A tiny pipeline where neuron 5 of the first cross-attention layer makes one prompt memorized."""
    from harden.tiny import MEMORIZED, REFERENCES
    from harden.tiny import plant_memorization, tiny_pipeline

    pipe = tiny_pipeline(seed=0, sample_size=32)
    layer = plant_memorization(pipe, MEMORIZED, REFERENCES)
    return pipe, layer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: their ops are too small to split, and a second thread spins while other
    processes share the 2 cores. Values do not depend on it. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
