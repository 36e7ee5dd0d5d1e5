"""Several processes (issue 21), on the CPU with the gloo backend: a rank's share of the heads runs its part of the plan
(`ModuleRuntime(..., heads=)`), a plan under diffusers' Ulysses context parallelism equals the plan in one process,
and calibration over prompts shared out by rank gives every rank the single-process statistics, bit for bit.

diffusers' ``enable_parallelism`` picks a device index with ``rank % torch.accelerator.device_count()``, which is a
division by zero on a machine without accelerators; the workers report one device (the mesh is built on the CPU)."""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import ditfa_optimum as dfa
from conftest import rand_qkv
from ditfa_optimum.plan import CompressionPlan, ModuleSpec
from ditfa_optimum.runtime import PlanRuntime
from ditfa_optimum.runtime.parallel import chunks_to_model_order, context_parallel, model_order_to_chunks

STEPS = 4


SHARES = [("cpu", "blocked")] + ([("cuda", "triton")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device, backend", SHARES)
def test_a_rank_runs_its_share_of_the_heads_as_the_whole_plan_does(device, backend):
    D, bs = (8, 4) if device == "cpu" else (64, 16)  # the fused kernel: 16-token blocks, a real head dim
    spec = ModuleSpec("blocks.0.attn", num_heads=4, head_dim=D, image_first=False)
    rows = [["full"] * 4] + [["arrow:1/2", "cache", "full", "arrow:1/4" if t % 2 else "cache"] for t in range(1, 4)]
    plan = CompressionPlan.from_methods([spec], {spec.name: rows}, block_size=bs)
    whole, halves = PlanRuntime(plan, backend=backend, cfg=False), [PlanRuntime(plan, backend=backend, cfg=False)
                                                                     for _ in range(2)]
    for step in range(4):
        q, k, v = rand_qkv(1, 4, 6 + 8 * bs, D, device=device)
        for rt in (whole, *halves):
            rt.state.on_transformer_call(torch.tensor([1000.0 - step]), 6)
        want = whole.module(spec)(q, k, v, num_text_tokens=6)
        for i, rt in enumerate(halves):
            lo = 2 * i
            got = rt.module(spec)(q[:, lo:lo + 2], k[:, lo:lo + 2], v[:, lo:lo + 2], num_text_tokens=6,
                                  heads=(lo, lo + 2))
            if device == "cpu":  # cached heads included: the same memory, per rank
                assert torch.equal(got, want[:, lo:lo + 2])
            else:  # the kernel may tune other tiles for another set of heads: another summation order
                torch.testing.assert_close(got, want[:, lo:lo + 2], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="are not 2 of its 4"):
        halves[0].module(spec)(q[:, :2], k[:, :2], v[:, :2], num_text_tokens=6, heads=(3, 5))
    with pytest.raises(ValueError, match="tensor parallelism"):
        whole.module(spec)(q[:, :2], k[:, :2], v[:, :2], num_text_tokens=6)


@pytest.mark.parametrize("first", [0, 3, 5])
def test_the_ranks_chunks_go_back_to_the_models_token_order(first):
    n, chunk = 3, 5  # three ranks, each chunk `first` tokens of one segment, then the other's
    tokens = torch.arange(n * chunk, dtype=torch.float32).reshape(1, 1, -1, 1)
    ordered = chunks_to_model_order(tokens, n, first)
    segment = [c * chunk + i for c in range(n) for i in range(first)]
    other = [c * chunk + i for c in range(n) for i in range(first, chunk)]
    assert ordered.flatten().tolist() == segment + other
    assert torch.equal(model_order_to_chunks(ordered, n, first), tokens)


def _processor(**cp):
    config = SimpleNamespace(context_parallel_config=SimpleNamespace(**{"ring_degree": 1, "ulysses_degree": 2, **cp}))
    return SimpleNamespace(_parallel_config=config)


def test_ring_attention_and_uneven_chunks_are_refused_with_the_fix():
    assert context_parallel(SimpleNamespace()) is None
    assert context_parallel(_processor(ulysses_degree=1)) is None
    assert context_parallel(_processor()).ulysses_degree == 2
    with pytest.raises(ValueError, match=r"ring attention .* ContextParallelConfig\(ulysses_degree=N\)"):
        context_parallel(_processor(ring_degree=2, ulysses_degree=1))
    with pytest.raises(ValueError, match="without ulysses_anything"):
        context_parallel(_processor(ulysses_anything=True))


# ------------------------------------------------------------------------------------------ two processes (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, tmp_path, *args):
    mp.start_processes(_init, args=(2, _free_port(), worker, str(tmp_path), *args), nprocs=2, join=True,
                       start_method="spawn")


def _init(rank, size, port, worker, out, *args):
    import logging

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        torch.accelerator.device_count = lambda: 1  # see the module docstring
        worker(rank, out, *args)
        # both ranks done before either closes its connections: one clean-clone run saw rank 0 abort in teardown
        # ("terminate called without an active exception"), not reproduced in 22 reruns
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _mixed_plan(pipe):
    plan = dfa.uniform_plan(pipe, num_steps=STEPS, method="full", block_size=4)
    for step in range(1, STEPS):
        for name in plan.module_names:
            plan.set(name, step, 0, "arrow:1/2")
            plan.set(name, step, 1, "cache")
            plan.set(name, step, 3, "arrow:1/4" if step % 2 else "cache")
    return plan


def _generate(pipe):
    from ditfa_optimum.tiny import TinyPromptEncoder

    encode = TinyPromptEncoder(pipe.transformer)
    return pipe(**encode(["a red cube on a blue floor"]), num_inference_steps=STEPS, height=128, width=128,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def _ulysses_worker(rank, out, order):
    from diffusers import ContextParallelConfig

    from ditfa_optimum.tiny import tiny_pipeline

    pipe = tiny_pipeline("flux", num_attention_heads=4)
    pipe.set_progress_bar_config(disable=True)
    if order == "plan first":
        dfa.apply(pipe, _mixed_plan(pipe))
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    if order in ("parallelism first", "compiled"):
        dfa.apply(pipe, _mixed_plan(pipe))
    if order == "compiled":  # what Dynamo sees: no graph break (fullgraph) with the exchange
        torch._dynamo.config.recompile_limit = 64
        transformer = pipe.transformer
        pipe.transformer = torch.compile(transformer, fullgraph=True, backend="eager")
    planned = _generate(pipe)
    if order == "compiled":
        pipe.transformer = transformer
    dfa.remove(pipe)
    stock = _generate(pipe)  # the stock processors run under the parallelism again, whichever came first
    torch.save({"planned": planned, "stock": stock}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("order", ["parallelism first", "plan first", "compiled"])
def test_a_plan_under_ulysses_parallelism_equals_the_plan_in_one_process(tmp_path, order):
    pytest.importorskip("diffusers", minversion="0.36")
    from ditfa_optimum.tiny import tiny_pipeline

    pipe = tiny_pipeline("flux", num_attention_heads=4)
    pipe.set_progress_bar_config(disable=True)
    stock = _generate(pipe)
    dfa.apply(pipe, _mixed_plan(pipe))
    planned = _generate(pipe)
    assert not torch.allclose(planned, stock, atol=1e-2)  # the plan changes the output: the check has teeth
    _spawn(_ulysses_worker, tmp_path, order)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["planned"], planned, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["stock"], stock, rtol=1e-5, atol=1e-5)


def _calibration_config():
    from search_helpers import tiny_setup

    pipe, encode, config = tiny_setup("flux", allocation="trajectory", num_inference_steps=5, height=128, width=128,
                                      batch_size=1, target_cut=0.4, verify_plans=2, calibration_passes=2)
    return pipe, encode, config


def _calibration_worker(rank, out, prompts):
    from ditfa_optimum.calibrate import calibrate
    from ditfa_optimum.search import search

    pipe, encode, config = _calibration_config()
    stats = calibrate(pipe, config, prompts, prompt_encoder=encode, progress=False)
    torch.save({"err": stats.err, "ref": stats.ref, "err_guided": stats.err_guided, "chosen": stats.chosen,
                "step_damage": stats.step_damage, "selections": stats.selections,
                "plan": search(stats, config)}, os.path.join(out, f"rank{rank}.pt"))


def test_calibration_shared_out_over_two_processes_equals_one_process(tmp_path):
    from ditfa_optimum.calibrate import calibrate
    from ditfa_optimum.search import search

    prompts = ["a red cube", "a green ball on grass", "two cats", "a lighthouse at night", "a bowl of fruit"]
    pipe, encode, config = _calibration_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: CPU matmuls may sum in another order with another thread count
    try:
        stats = calibrate(pipe, config, prompts, prompt_encoder=encode, progress=False)
    finally:
        torch.set_num_threads(threads)
    plan = search(stats, config)
    assert plan.metadata["search"]["flop_cut"] > 0.1  # a plan that does something
    _spawn(_calibration_worker, tmp_path, prompts)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for kind in ("err", "ref", "err_guided", "chosen", "step_damage"):
            mine = getattr(stats, kind)
            assert mine.keys() == got[kind].keys()
            assert all(torch.equal(mine[name], got[kind][name]) for name in mine), kind
        assert got["selections"] == stats.selections
        untimed = [{k: v for k, v in p.metadata["search"].items() if not k.endswith("seconds")}
                   for p in (got["plan"], plan)]
        assert got["plan"] == plan and untimed[0] == untimed[1]


def _writer_worker(rank, out):
    from ditfa_optimum import distributed
    from ditfa_optimum.optimizer import DiTFastAttnOptimizer
    from ditfa_optimum.tiny import tiny_pipeline

    pipe = tiny_pipeline("flux")
    opt = DiTFastAttnOptimizer(pipe)
    opt.plan = dfa.uniform_plan(pipe, num_steps=STEPS, method="arrow:1/2", block_size=4)
    calls = []
    assert distributed.from_rank0(lambda: calls.append(rank) or "rank 0's") == "rank 0's"
    assert calls == ([0] if rank == 0 else []) and distributed.world() == (rank, 2)
    assert distributed.my_batches(list(range(6))) == [[1, 3, 5], [2, 4]][rank]
    with pytest.raises((ZeroDivisionError, RuntimeError), match="division by zero"):  # no rank left waiting
        distributed.from_rank0(lambda: 1 / 0)
    for name in ("plan", "again"):  # one writer: no clash over the directory, no "exists" refusal on rank 1
        saved = opt.save_plan(os.path.join(out, name))
        assert saved.name == name and (saved / "plan.json").exists()  # written before any rank returns


def test_only_rank_0_writes_and_every_rank_returns_after_it(tmp_path):
    _spawn(_writer_worker, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "plan"]
