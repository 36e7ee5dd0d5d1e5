import contextlib
import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; must be set before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # many small shapes: compile one configuration each instead of autotuning every shape
    os.environ.setdefault("DITFA_TRITON_AUTOTUNE", "0")

from ditfa_optimum.masks import TokenLayout


#: where device-dependent tests run: the CPU always, and CUDA too on a machine that has it (as optimum-quanto's tests
#: do), so one suite checks both: ``pytest`` on a GPU machine runs every such test on both devices
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def backends_on(device: torch.device) -> list[str]:
    """The attention backends that run on ``device``, the fused Triton kernel included where it compiles (CUDA; on the
    CPU its interpreter is tested by tests/kernels)."""
    return ["reference", "blocked", "flex"] + (["triton"] if device.type == "cuda" else [])


def pytest_configure(config):
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    config.addinivalue_line("markers", "cpu_fp8: runs torchao's FP8 matmul on the CPU (per-row scales), skipped where "
                            "this torch's CPU _scaled_mm takes per-tensor scales only")


def cpu_rowwise_fp8_matmul() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes per-row scales, which the FP8 linears' tests run on the CPU:
    torch 2.13 does; 2.11 (the GPU image's) asserts "only supports per-tensor scaling for CPU backend"."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


#: the slowest modules (CPU suite durations, 2026-12-02: the quality gate's two tests take 2.5 and 6 minutes), which
#: pytest-xdist should hand out first: its workers take tests in collection order, so a slow module collected last
#: finishes long after the rest (benchmarks/gpu_tests.sh)
SLOWEST_FIRST = ("tests/test_quality_gate.py",)


def pytest_collection_modifyitems(config, items):
    needs_cpu_fp8 = [item for item in items if item.get_closest_marker("cpu_fp8")]
    if needs_cpu_fp8 and not cpu_rowwise_fp8_matmul():
        skip = pytest.mark.skip(reason=f"torch {torch.__version__}'s CPU _scaled_mm has no per-row scales (torch "
                                "2.13 has); on an FP8 GPU the GPU tests of tests/test_fp8_linears.py cover the matmul")
        for item in needs_cpu_fp8:
            item.add_marker(skip)
    # only under xdist (-n, and on its workers, which do the collecting): a plain run keeps the file order
    if getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput"):
        first = [item for item in items if item.nodeid.startswith(SLOWEST_FIRST)]
        items[:] = first + [item for item in items if not item.nodeid.startswith(SLOWEST_FIRST)]


@contextlib.contextmanager
def _torch_threads(n: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Torch on one thread for a test: tiny tensors and many small ops run several (up to 100) times slower on two
    threads of a busy two-core machine."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread_module")``)."""
    with _torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # fresh random inputs every run, but reproducible from the printed seed when a test fails
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def naive_keep(layout: TokenLayout, width: int) -> torch.Tensor:
    """The arrow mask written straight from the definition in masks.py, one (query, key) pair at a time."""
    S, n_blk, bs = layout.seq_len, layout.num_image_blocks, layout.block_size
    keep = torch.zeros(S, S, dtype=torch.bool)
    for qpos in range(S):
        for kpos in range(S):
            qi, ki = qpos - layout.image_start, kpos - layout.image_start
            q_img = 0 <= qi < layout.num_image_tokens
            k_img = 0 <= ki < layout.num_image_tokens
            if not q_img or not k_img:
                keep[qpos, kpos] = True
                continue
            start = min(max(qi // bs - width // 2, 0), n_blk - width)
            keep[qpos, kpos] = start <= ki // bs < start + width
    return keep


def naive_attention(q, k, v, keep=None):
    """Softmax attention in float64 with an explicit -inf mask; [..., S, D]."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def rand_qkv(B, H, S, D, dtype=torch.float32, device=None):
    return [torch.randn(B, H, S, D, dtype=dtype, device=device) for _ in range(3)]
