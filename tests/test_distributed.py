"""utils.distributed: a bad launch fails before a process group starts; alone, DDP and FSDP give the same
per-step losses.

The slow tests start `torch.distributed.run` with 2 processes on 127.0.0.1 (gloo on CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from utils.distributed import (
    check_launch,
    communication_bytes,
    held_bytes,
    launch,
    launch_command,
    main,
    memory_per_rank,
)

REPO = Path(__file__).resolve().parent.parent
TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}  # what torchrun sets for rank 0 of 2
STEPS, BATCH, SEED = 4, 4, 3  # small enough for ~10 s per 2-process run on 2 shared cores
TIMEOUT_S = 300


# --------------------------------------------------------------------------------------------
# Bad input: fast, in-process, no process group
# --------------------------------------------------------------------------------------------

def test_check_launch_returns_the_number_of_processes():
    assert check_launch("single", 3, 8, 0, env={}) == 1
    assert check_launch("ddp", 3, 8, 0, env=TORCHRUN_ENV) == 2
    assert check_launch("fsdp", 3, 8, 0, grad_accum=2, env=TORCHRUN_ENV) == 2


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(mode="zero3"), {}, "mode must be one of"),
    (dict(steps=0), {}, "steps must be a positive int"),
    (dict(batch_size=0), {}, "batch_size must be a positive int"),
    (dict(seed=-1), {}, "seed must be an int >= 0"),
    (dict(batch_size=5), TORCHRUN_ENV, "must be divisible by the number of processes 2"),
    (dict(mode="ddp"), {}, "needs the process group variables that torchrun sets"),
    (dict(mode="fsdp"), {}, "needs the process group variables that torchrun sets"),
    (dict(mode="single"), TORCHRUN_ENV, "torchrun started 2"),
    (dict(batch_size=6, grad_accum=2), TORCHRUN_ENV, "divisible by grad_accum=2"),
])
def test_check_launch_refuses_bad_input(kwargs, env, message):
    args = dict(mode="ddp", steps=3, batch_size=8, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        check_launch(**args, env=env)


def test_check_launch_refuses_wrong_types():
    with pytest.raises(TypeError, match="steps must be an int"):
        check_launch("single", 2.5, 8, 0, env={})


@pytest.mark.parametrize("argv, message", [
    (["--mode", "zero3", "--steps", "3", "--batch-size", "8"], "invalid choice: 'zero3'"),
    (["--mode", "single", "--steps", "0", "--batch-size", "8"], "steps must be a positive int"),
    (["--mode", "ddp", "--steps", "3", "--batch-size", "8"], "torchrun"),
    (["--mode", "single", "--steps", "3", "--batch-size", "8", "--threads", "0"], "threads must be"),
    (["--mode", "single", "--steps", "3", "--batch-size", "8", "--bf16", "--dtype", "float64"], "float32 weights"),
])
def test_main_exits_with_a_message_before_any_process_group(argv, message, monkeypatch, capsys):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not dist.is_initialized()


def test_held_bytes_counts_what_a_rank_stores():
    import torch

    assert held_bytes([torch.zeros(3, 4), None, torch.zeros(5, dtype=torch.uint8)]) == 3 * 4 * 4 + 5


def test_memory_per_rank_follows_the_zero_stages():
    n = 1_000_000
    ddp = memory_per_rank(n, 4, 0)
    assert ddp == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n, "total": 16 * n}
    assert memory_per_rank(n, 4, 1)["total"] == 4 * n + 4 * n + 2 * n
    assert memory_per_rank(n, 4, 2)["total"] == 4 * n + n + 2 * n
    assert memory_per_rank(n, 4, 3)["total"] == 4 * n == 16 * n // 4
    assert memory_per_rank(7_000_000_000, 8, 3)["total"] == 14_000_000_000
    assert memory_per_rank(n, 1, 3) == ddp  # one rank: nothing to shard with
    with pytest.raises(ValueError, match="zero_stage"):
        memory_per_rank(n, 2, 4)
    with pytest.raises(ValueError, match="world_size"):
        memory_per_rank(n, 0, 1)


def test_communication_bytes_of_ring_collectives():
    assert communication_bytes(1_000_000, 2, "ddp") == 4_000_000  # 2 * (1/2) * 4 MB
    assert communication_bytes(1_000_000, 8, "ddp") == 7_000_000  # approaches 2x the gradient bytes
    assert communication_bytes(1_000_000, 2, "fsdp") == 6_000_000  # 1.5x DDP
    assert communication_bytes(1_000_000, 1, "ddp") == 0  # alone: nothing to send
    assert communication_bytes(1_000_000, 4, "single") == 0
    with pytest.raises(ValueError, match="mode must be one of"):
        communication_bytes(10, 2, "zero3")


def test_launch_command_under_each_launcher():
    assert launch_command("single", 3, 8, 1)[1:] == ["-m", "utils.distributed", "--mode", "single", "--steps", "3",
                                                     "--batch-size", "8", "--seed", "1"]
    torchrun = launch_command("ddp", 3, 8, nproc=2, port=12345)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"] and "127.0.0.1" in torchrun and "12345" in torchrun
    accelerate = launch_command("fsdp", 3, 8, launcher="accelerate", port=12345)
    assert accelerate[1:3] == ["-m", "accelerate.commands.launch"] and accelerate[-10:-6] == [
        "-m", "utils.distributed", "--mode", "fsdp"]
    with pytest.raises(ValueError, match="launcher"):
        launch_command("ddp", 3, 8, launcher="deepspeed")


# --------------------------------------------------------------------------------------------
# Real runs: one process, then torchrun with 2 processes
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cli(mode: str, nproc: int | None, *extra: str) -> subprocess.CompletedProcess:
    """Run the command line (under torchrun when nproc is given) on loopback; every process must exit."""
    args = ["-m", "utils.distributed", "--mode", mode, "--steps", str(STEPS), "--batch-size", str(BATCH),
            "--seed", str(SEED), "--device", "cpu", *extra]
    if nproc is not None:
        args = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo talks over loopback only
    env["PYTHONFAULTHANDLER"] = "1"
    with subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # torchrun starts its workers in sessions of their own: find them, make each print where
            # it hung (SIGABRT + PYTHONFAULTHANDLER), then make sure none of them outlives the test
            workers = psutil.Process(process.pid).children(recursive=True)
            for worker in workers:
                worker.send_signal(signal.SIGABRT)
            psutil.wait_procs(workers, timeout=10)
            for leftover in [*workers, psutil.Process(process.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    leftover.kill()
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(args)} ran past {TIMEOUT_S} s\n"
                        f"stdout:\n{stdout}\nstderr:\n{stderr[-5000:]}")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def parse(result: subprocess.CompletedProcess) -> tuple[list[float], dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    *steps, summary = lines
    assert steps == [{"step": i + 1, "loss": line["loss"]} for i, line in enumerate(steps)]  # nothing else
    assert len(steps) == STEPS
    return [line["loss"] for line in steps], summary["summary"]


@pytest.fixture(scope="module")
def single():
    return parse(launch_cli("single", None))


@pytest.mark.slow
def test_single_run_trains(single):
    losses, summary = single
    assert losses[-1] < losses[0]
    assert summary["world_size"] == 1 and summary["ranks"][0]["param_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode, extra", [("ddp", ()), ("fsdp", ()),
                                         ("ddp", ("--grad-accum", "2")), ("fsdp", ("--grad-accum", "2"))])
def test_two_processes_give_the_single_process_losses(mode, extra, single):
    # separate processes, the same seed: the same weights, the same batches and so the same losses
    losses, summary = parse(launch_cli(mode, 2, *extra))
    assert losses == pytest.approx(single[0], abs=1e-4)
    assert summary["world_size"] == 2 and len(summary["ranks"]) == 2
    full = single[1]["ranks"][0]
    for rank in summary["ranks"]:
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
            share = rank[key] / full[key]
            if mode == "ddp":  # a full copy on every rank
                assert share == 1.0, (key, share)
            else:  # about half: Adam's step counters are not sharded
                assert 0.45 < share < 0.55, (key, share)


@pytest.mark.slow
def test_a_bad_launch_under_torchrun_fails_cleanly():
    result = launch_cli("ddp", 2, "--batch-size", "3")  # a later --batch-size wins: 3 rows for 2 processes
    assert result.returncode != 0
    assert "must be divisible by the number of processes 2" in result.stderr
    assert '"step"' not in result.stdout


@pytest.mark.slow
def test_accelerate_launch_gives_the_same_losses(single):
    losses, summary = launch("ddp", STEPS, BATCH, SEED, nproc=2, launcher="accelerate", extra=("--device", "cpu"),
                             timeout=TIMEOUT_S)
    assert losses == pytest.approx(single[0], abs=1e-4)
    assert summary["world_size"] == 2


@pytest.mark.slow
def test_bf16_autocast_changes_the_losses_a_little(single):
    losses, summary = launch("single", STEPS, BATCH, SEED, extra=("--device", "cpu", "--bf16"), timeout=TIMEOUT_S)
    assert summary["bf16"] is True
    differences = [abs(a - b) for a, b in zip(losses, single[0])]
    assert 0 < max(differences) < 0.1, differences  # rounded matmuls: close, not equal


@pytest.mark.slow
def test_launch_reports_a_failed_run():
    with pytest.raises(RuntimeError, match="must be divisible by the number of processes 2"):
        launch("ddp", STEPS, 3, SEED, nproc=2, extra=("--device", "cpu"), timeout=TIMEOUT_S)


@pytest.mark.slow
def test_training_data_is_lesson_05s_training_ids():
    import torch

    from utils.distributed import training_data
    from utils.tiny_gpt import shakespeare_char_data

    ids, vocab_size = training_data()
    tokenizer, train_ids, _ = shakespeare_char_data()
    assert vocab_size == tokenizer.vocab_size and ids.dtype == torch.uint8
    assert torch.equal(ids.long(), train_ids)
