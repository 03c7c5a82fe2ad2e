"""Lesson 05's training loop, spread over several processes: data parallel (DDP) and sharded (FSDP).

    python -m utils.distributed --mode single --steps 20 --batch-size 16 --seed 0
    torchrun --standalone --nproc_per_node 2 -m utils.distributed --mode ddp --steps 20 --batch-size 16
    torchrun --standalone --nproc_per_node 2 -m utils.distributed --mode fsdp --steps 20 --batch-size 16

All three print the same loss at every step (measured: within 3e-5): rank 0 writes one JSON line per step,
{"step": i, "loss": ...}, then one {"summary": {...}} line with step times, tokens/s and the bytes
of parameters, gradients and optimizer state that each rank holds. Shown in lesson 16.

Why the losses agree. `--batch-size B` is the GLOBAL batch. Every rank draws the SAME B windows
from a generator seeded with `--seed` and keeps its own slice of B/K rows (K = number of
processes). The step's loss is the mean over all B*T tokens; because the slices have equal
sizes, that mean is the mean of the K per-rank means, and so is its gradient:

    grad( (1/K) * sum_k loss_k ) = (1/K) * sum_k grad(loss_k) = all-reduce-sum(grad_k) / K

DDP and FSDP average the gradients across ranks in exactly this way, so every rank sees the
full-batch gradient, clips it and takes the same AdamW step a single process would take. Only the
order of floating-point additions differs (the sums are split differently): about 1e-7 at first,
growing to ~1e-5 as training amplifies it.
Gradient accumulation (`--grad-accum M`) splits each rank's slice into M equal micro-batches and
divides each micro-batch loss by M: the same mean again, computed in pieces.

DDP vs FSDP (the ZeRO stages). In float32, AdamW training holds 4 bytes of parameter, 4 of
gradient and 8 of optimizer state (two moments) per parameter: 16 bytes each.
* DDP keeps a full copy of all three on every rank, 16 bytes/param per rank, and all-reduces the
  gradients during backward (each rank sends and receives about 2x the gradient bytes per step).
* ZeRO-1 shards the optimizer state across the K ranks, ZeRO-2 also the gradients, ZeRO-3 also
  the parameters: (4 + 4 + 8) / K bytes/param per rank. FSDP (`fully_shard`) is ZeRO-3: between
  steps each rank holds 1/K of every weight; before a block runs (forward and backward) its weights
  are all-gathered, after the backward its gradients are reduce-scattered, so each rank keeps and
  updates only its own shard. About 1.5x DDP's communication, for 1/K of the memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from utils.checks import check_int, check_positive_int
from utils.gpt import GPT, GPTConfig
from utils.tiny_gpt import TINY_MODEL_SHAPE, TINY_TRAIN_CONFIG, shakespeare_char_data
from utils.training import TrainConfig, get_batch, lr_at, make_optimizer

MODES = ("single", "ddp", "fsdp")
BLOCK_SIZE = TINY_TRAIN_CONFIG.block_size  # lesson 05's context (64 characters)
MODEL_SHAPE = TINY_MODEL_SHAPE  # lesson 05's tiny GPT: 4 layers, 4 heads, 128 wide
PEAK_LR, MIN_LR = TINY_TRAIN_CONFIG.lr, TINY_TRAIN_CONFIG.min_lr  # lesson 05's learning rates
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_launch(mode: str, steps: int, batch_size: int, seed: int, grad_accum: int = 1, env=None) -> int:
    """The number of processes K if the run can start, else ValueError. Reads torchrun's variables.

    Example: check_launch("ddp", 5, 16, 0, env={"WORLD_SIZE": "2", "RANK": "0", ...}) -> 2.
    """
    env = os.environ if env is None else env
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_int("seed", seed, low=0)
    check_positive_int("grad_accum", grad_accum)
    under_torchrun = all(name in env for name in TORCHRUN_VARIABLES)
    world_size = int(env["WORLD_SIZE"]) if under_torchrun else 1
    if mode != "single" and not under_torchrun:
        raise ValueError(f"mode {mode!r} needs the process group variables that torchrun sets; launch it as: "
                         f"torchrun --standalone --nproc_per_node 2 -m utils.distributed --mode {mode} ...")
    if mode == "single" and world_size > 1:
        raise ValueError(f"mode 'single' runs in one process, but torchrun started {world_size}; "
                         f"use --mode ddp or --mode fsdp, or run it without torchrun")
    if batch_size % world_size != 0:
        raise ValueError(f"the global batch size {batch_size} must be divisible by the number of "
                         f"processes {world_size}: each rank takes an equal slice")
    if (batch_size // world_size) % grad_accum != 0:
        raise ValueError(f"each rank's slice of {batch_size // world_size} rows must be divisible by "
                         f"grad_accum={grad_accum}: micro-batches must have equal sizes")
    return world_size


def training_data() -> tuple[torch.Tensor, int]:
    """(train_ids, vocab_size): lesson 05's character-level Shakespeare, training works only."""
    tokenizer, train_ids, _ = shakespeare_char_data()  # lesson 05's split and its 84 characters
    # uint8 holds every id (vocab < 256) in 1/8 of int64's memory; get_batch converts windows to long
    return train_ids.to(torch.uint8), tokenizer.vocab_size  # (N,)


def wrap(model: GPT, mode: str, device: torch.device, world_size: int) -> torch.nn.Module:
    """The model as `mode` trains it: as is, replicated (DDP), or sharded (FSDP2's fully_shard)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's weights, then all-reduces (averages) the gradients during backward
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model.to(device), device_ids=device_ids)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size,))  # one axis: K ranks, each holds one shard
        for block in model.transformer.h:  # one all-gather per block: only one block is whole at a time
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embeddings (tied to lm_head) and the final LayerNorm
        return model  # the same module; its parameters are now DTensors sharded on dim 0
    return model.to(device)


def held_bytes(tensors) -> int:
    """Bytes of the tensors that THIS rank stores (its local shard of an FSDP DTensor).

    Example: held_bytes([torch.zeros(3, 4), None]) -> 48.
    """
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t  # DTensor -> this rank's shard
        total += local.numel() * local.element_size()
    return total


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(mode: str, steps: int, batch_size: int, seed: int, grad_accum: int = 1, bf16: bool = False,
        device_name: str = "auto", threads: int | None = None) -> None:
    """Train for `steps` steps; rank 0 prints the JSON lines. Call check_launch first.

    threads: CPU threads per process; None shares the cores (2 processes on 2 cores: 1 thread each,
    rather than 4 threads fighting over 2 cores).
    """
    world_size = int(os.environ["WORLD_SIZE"]) if mode != "single" else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available()
                                         and torch.cuda.device_count() >= local_procs)  # a GPU per rank
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_procs))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # lets cuBLAS be deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn (not fail) if a GPU kernel has no such mode
    random.seed(seed)
    torch.manual_seed(seed)  # the same initial weights on every rank

    if mode != "single":  # gloo moves CPU tensors between processes, nccl GPU tensors between GPUs
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    rank = dist.get_rank() if mode != "single" else 0

    train_ids, vocab_size = training_data()
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=BLOCK_SIZE, **MODEL_SHAPE))  # built on CPU
    model = wrap(model, mode, device, world_size)
    config = TrainConfig(max_steps=steps, batch_size=batch_size, block_size=BLOCK_SIZE, lr=PEAK_LR,
                         min_lr=MIN_LR, warmup_steps=steps // 20, seed=seed)  # lesson 05: 5% warm-up
    optimizer = make_optimizer(model, config)  # after wrap: FSDP's AdamW sees (and updates) only shards
    generator = torch.Generator().manual_seed(seed)  # the same batches on every rank, in every mode
    rows = batch_size // world_size  # this rank's slice of the global batch
    micro = rows // grad_accum  # rows per micro-batch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    step_times = []
    model.train()
    for step in range(steps):
        tic = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        x, y = get_batch(train_ids, batch_size, BLOCK_SIZE, generator)  # (B, T) each, the same on all ranks
        mine = slice(rank * rows, (rank + 1) * rows)  # this rank's rows
        x, y = x[mine].to(device), y[mine].to(device)  # (B/K, T)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)  # this rank's mean loss, summed over micro-batches
        for m in range(grad_accum):
            last = m == grad_accum - 1
            # communicate once per step, after the last micro-batch, not after each of them
            if mode == "fsdp":
                model.set_requires_gradient_sync(last)
            no_sync = model.no_sync() if mode == "ddp" and not last else contextlib.nullcontext()
            xm, ym = x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]  # (B/K/M, T)
            with no_sync:
                with autocast:
                    logits = model(xm)  # (B/K/M, T, vocab)
                loss = F.cross_entropy(logits.float().reshape(-1, vocab_size), ym.reshape(-1)) / grad_accum
                loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)  # norm of the FULL gradient
        optimizer.step()
        if use_cuda:
            torch.cuda.synchronize()  # GPU work is asynchronous: wait for it before reading the clock
        step_times.append(time.perf_counter() - tic)
        if mode != "single":  # for printing only: the global-batch mean is the mean of the rank means
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_sum /= world_size
        if rank == 0:
            print(json.dumps({"step": step + 1, "loss": loss_sum.item()}), flush=True)

    params = list(model.parameters())  # a tied matrix counts once
    median = statistics.median(step_times)
    optimizer_state = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    this_rank = {"rank": rank, "step_time_median_s": median, "tokens_per_s": rows * BLOCK_SIZE / median,
                 "param_bytes": held_bytes(params), "grad_bytes": held_bytes(p.grad for p in params),
                 "optimizer_state_bytes": held_bytes(optimizer_state),
                 "peak_memory_mib": peak_memory_mib(device)}
    ranks = [this_rank]
    if mode != "single":
        ranks = [None] * world_size
        dist.all_gather_object(ranks, this_rank)
    if rank == 0:
        slowest = max(r["step_time_median_s"] for r in ranks)  # a step ends when the slowest rank ends
        summary = {"mode": mode, "world_size": world_size, "device": device.type, "steps": steps,
                   "global_batch": batch_size, "grad_accum": grad_accum, "bf16": bf16,
                   "tokens_per_s": batch_size * BLOCK_SIZE / slowest, "ranks": ranks}
        print(json.dumps({"summary": summary}), flush=True)
    if mode != "single":
        # Tear down in an order that cannot deadlock. The last thread to drop a finished collective
        # frees its tensors, which needs the GIL; if that is gloo's worker thread while this thread
        # (holding the GIL) waits for the worker to stop inside the process group's destructor, both
        # wait forever. So: keep the barrier's handle (and through it the earlier collectives) alive
        # until the process group is gone, and free the model (DDP's Reducer holds the group) first.
        finished = dist.barrier(async_op=True)  # no rank leaves while another still talks to it
        finished.wait()
        del model, optimizer
        gc.collect()  # FSDP's hooks make reference cycles: free them now, not at some later time
        dist.destroy_process_group()
        del finished  # the process group is gone: only this thread can free it now


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="the GLOBAL batch, split across ranks")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the order of the batches")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank and step")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (the losses then differ)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a GPU per process if there are enough, else the CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process "
                        "(default: the cores divided by the processes on this machine)")
    args = parser.parse_args(argv)
    try:  # every check runs BEFORE a process group starts, so a bad launch fails fast and cleanly
        check_launch(args.mode, args.steps, args.batch_size, args.seed, args.grad_accum)
        if args.threads is not None:
            check_positive_int("threads", args.threads)
        if args.device == "cuda" and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
            raise ValueError("--device cuda needs a GPU for every process on this machine; "
                             f"torch sees {torch.cuda.device_count()}; use --device cpu or auto")
    except ValueError as err:
        parser.error(str(err))  # prints the usage and the message, exits with status 2
    run(args.mode, args.steps, args.batch_size, args.seed, args.grad_accum, args.bf16, args.device, args.threads)


if __name__ == "__main__":
    main(sys.argv[1:])
