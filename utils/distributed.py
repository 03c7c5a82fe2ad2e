"""Lesson 05's training loop, spread over several processes: data parallel (DDP) and sharded (FSDP).

    python -m utils.distributed --mode single --steps 20 --batch-size 16 --seed 0
    torchrun --standalone --nproc_per_node 2 -m utils.distributed --mode ddp --steps 20 --batch-size 16
    torchrun --standalone --nproc_per_node 2 -m utils.distributed --mode fsdp --steps 20 --batch-size 16

All three print the same loss at every step (measured: within 1e-9 over 30 steps, float64): rank 0
writes one JSON line per step, {"step": i, "loss": ...}, then one {"summary": {...}} line with step
times, tokens/s and the bytes of parameters, gradients and optimizer state that each rank holds. Shown in lesson 17.
`launch()` runs the command line as child processes (under torchrun or `accelerate launch`) and
returns the losses; `communication_bytes` and `memory_per_rank` are the arithmetic of N GPUs.

Why the losses agree. `--batch-size B` is the GLOBAL batch. Every rank draws the SAME B windows
from a generator seeded with `--seed` and keeps its own slice of B/K rows (K = number of
processes). The step's loss is the mean over all B*T tokens; because the slices have equal
sizes, that mean is the mean of the K per-rank means, and so is its gradient:

    grad( (1/K) * sum_k loss_k ) = (1/K) * sum_k grad(loss_k) = all-reduce-sum(grad_k) / K

DDP and FSDP average the gradients across ranks in exactly this way, so every rank sees the
full-batch gradient, clips it and takes the same AdamW step a single process would take. Only the
order of floating-point additions differs (the sums are split differently): in float64 about 1e-16
at the first step and ~1e-9 after 30 steps (lesson 17); in float32 training amplifies it (below).
Gradient accumulation (`--grad-accum M`) splits each rank's slice into M equal micro-batches and
divides each micro-batch loss by M: the same mean again, computed in pieces.

Float64 by default. The rounding differences above are amplified by training:
in float32, after 30 AdamW steps at lesson 05's learning rate, single and DDP (or the same single
run with 1 vs 2 threads) drift apart by more than 1e-4. In float64 the same differences start near
1e-16 and stay far below 1e-4 for any run this script is used for, so a per-step comparison tests
the method, not the rounding. `--dtype float32` shows the drift; `--bf16` autocasts float32 weights.

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
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from utils.checks import check_choice, check_int, check_positive_int
from utils.env import available_cpus
from utils.gpt import GPT, GPTConfig
from utils.tiny_gpt import TINY_MODEL_SHAPE, TINY_TRAIN_CONFIG
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


ZERO_STAGES = {0: "DDP: everything replicated", 1: "optimizer state sharded",
               2: "+ gradients sharded", 3: "+ parameters sharded (FSDP)"}


def memory_per_rank(n_params: int, world_size: int, zero_stage: int, param_bytes: int = 4, grad_bytes: int = 4,
                    optimizer_bytes: int = 8) -> dict:
    """Bytes of parameters, gradients and optimizer state ONE rank holds (activations not included).

    Defaults: float32 AdamW (4 + 4 + 8 bytes per parameter). Shown in lesson 17.
    Example: memory_per_rank(7_000_000_000, 8, 3)["total"] -> 14_000_000_000  (7B, 8 GPUs, ZeRO-3)
    """
    check_positive_int("n_params", n_params)
    check_positive_int("world_size", world_size)
    check_int("zero_stage", zero_stage, low=0, high=3)
    shard = {"params": zero_stage >= 3, "grads": zero_stage >= 2, "optimizer": zero_stage >= 1}
    held = {name: n_params * size // (world_size if shard[name] else 1)
            for name, size in (("params", param_bytes), ("grads", grad_bytes), ("optimizer", optimizer_bytes))}
    return held | {"total": sum(held.values())}


def communication_bytes(n_params: int, world_size: int, mode: str, bytes_per_value: int = 4) -> int:
    """Bytes ONE rank sends per optimizer step (ring algorithms), for gradients of n_params values.

    ddp:  an all-reduce = reduce-scatter + all-gather: 2 (K-1)/K of the gradient bytes.
    fsdp: all-gather the weights for forward and again for backward, reduce-scatter the gradients:
          3 (K-1)/K of them. single: nothing. Shown in lesson 17.
    Example: communication_bytes(1_000_000, 2, "ddp") -> 4_000_000
    """
    check_positive_int("n_params", n_params)
    check_positive_int("world_size", world_size)
    check_choice("mode", mode, MODES)
    passes = {"single": 0, "ddp": 2, "fsdp": 3}[mode]
    return passes * (world_size - 1) * n_params * bytes_per_value // world_size


def training_data() -> tuple[torch.Tensor, int]:
    """(train_ids, vocab_size): lesson 05's character-level Shakespeare, training works only.

    The same ids as lesson 05's `shakespeare_char_data()`, encoded through a lookup table into uint8
    (every id < 256) instead of a Python list and an int64 tensor: ~70 MB less peak memory in every
    rank, which counts when several ranks share one machine. get_batch converts windows to int64.
    """
    import numpy as np

    from utils.data import shakespeare
    from utils.training import VAL_WORKS, CharTokenizer, split_by_work

    train_text, val_text = split_by_work(shakespeare(), VAL_WORKS)  # lesson 05's split
    tokenizer = CharTokenizer.from_text(train_text + val_text)  # and its 84 characters
    codes = np.frombuffer(train_text.encode("utf-32-le"), dtype=np.uint32)  # (N,) code points
    table = np.zeros(max(map(ord, tokenizer.chars)) + 1, dtype=np.uint8)  # code point -> id
    table[[ord(c) for c in tokenizer.chars]] = np.arange(tokenizer.vocab_size, dtype=np.uint8)
    return torch.from_numpy(table[codes]), tokenizer.vocab_size  # (N,) uint8


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
        device_name: str = "auto", threads: int | None = None, dtype_name: str = "auto") -> None:
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
        torch.set_num_threads(threads or max(1, available_cpus() // local_procs))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # lets cuBLAS be deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn (not fail) if a GPU kernel has no such mode
    random.seed(seed)
    torch.manual_seed(seed)  # the same initial weights on every rank

    if mode != "single":  # gloo moves CPU tensors between processes, nccl GPU tensors between GPUs
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    rank = dist.get_rank() if mode != "single" else 0

    train_ids, vocab_size = training_data()
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype_name, torch.float32 if bf16 else torch.float64)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=BLOCK_SIZE, **MODEL_SHAPE))  # built on CPU
    model = model.to(dtype)  # float64 by default: see the module docstring
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
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # this rank's mean loss, summed over
        # micro-batches; float64 whatever the weights, so the printed loss is not rounded to float32
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
                loss = F.cross_entropy(logits.to(dtype).reshape(-1, vocab_size), ym.reshape(-1)) / grad_accum
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
                   "dtype": str(dtype).removeprefix("torch."), "n_params": sum(p.numel() for p in params),
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


LAUNCHERS = ("torchrun", "accelerate")
REPO_ROOT = Path(__file__).resolve().parent.parent


def launch_command(mode: str, steps: int, batch_size: int, seed: int = 0, nproc: int = 2,
                   launcher: str = "torchrun", extra=(), port: int = 29500) -> list[str]:
    """The command that runs this module: alone (mode "single") or with `nproc` processes started by
    torchrun or by `accelerate launch` (which calls torchrun itself), rendezvous on 127.0.0.1:port.

    Example: launch_command("ddp", 5, 8)[:3] -> [sys.executable, "-m", "torch.distributed.run"]
    """
    check_choice("launcher", launcher, LAUNCHERS)
    check_positive_int("nproc", nproc)
    script = ["-m", "utils.distributed", "--mode", mode, "--steps", str(steps), "--batch-size",
              str(batch_size), "--seed", str(seed), *extra]
    if mode == "single":
        return [sys.executable, *script]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(port), *script]
    # --multi_gpu picks accelerate's torchrun path; on a machine without GPUs it runs on the CPU (gloo)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), *script]


def launch(mode: str, steps: int, batch_size: int, seed: int = 0, nproc: int = 2, launcher: str = "torchrun",
           extra=(), timeout: float = 600.0) -> tuple[list[float], dict]:
    """Run the command line as child processes; return (the loss of every step, rank 0's summary).

    Loopback only (gloo over `lo`); a failed run raises RuntimeError with the end of its stderr, and
    a run past `timeout` seconds is killed with all its processes. Shown in lesson 17.
    Example: launch("fsdp", 20, 16, nproc=2)[0][:2] -> [4.4779, 4.0407]
    """
    import psutil

    check_choice("mode", mode, MODES)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo talks over the loopback interface only
    env.setdefault("MALLOC_ARENA_MAX", "2")  # fewer per-thread malloc arenas: less memory per rank
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = launch_command(mode, steps, batch_size, seed, nproc, launcher, extra, port)
    with subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # the launcher and every worker it started
            for leftover in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    leftover.kill()
            process.communicate()
            raise TimeoutError(f"{' '.join(command)} ran past {timeout:g} s and was stopped") from None
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with code {process.returncode}:\n{stderr[-3000:]}")
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [line["loss"] for line in lines if "loss" in line], lines[-1]["summary"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="the GLOBAL batch, split across ranks")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the order of the batches")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank and step")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (the losses then differ)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float64"), default="auto",
                        help="the weights' dtype; auto: float64, or float32 with --bf16 (autocast skips float64)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: a GPU per process if there are enough, else the CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process "
                        "(default: the cores divided by the processes on this machine)")
    args = parser.parse_args(argv)
    try:  # every check runs BEFORE a process group starts, so a bad launch fails fast and cleanly
        check_launch(args.mode, args.steps, args.batch_size, args.seed, args.grad_accum)
        if args.threads is not None:
            check_positive_int("threads", args.threads)
        if args.bf16 and args.dtype == "float64":
            raise ValueError("--bf16 needs float32 weights (autocast leaves float64 alone): use --dtype float32 "
                             "or auto")
        if args.device == "cuda" and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
            raise ValueError("--device cuda needs a GPU for every process on this machine; "
                             f"torch sees {torch.cuda.device_count()}; use --device cpu or auto")
    except ValueError as err:
        parser.error(str(err))  # prints the usage and the message, exits with status 2
    run(args.mode, args.steps, args.batch_size, args.seed, args.grad_accum, args.bf16, args.device, args.threads,
        args.dtype)


if __name__ == "__main__":
    main(sys.argv[1:])
