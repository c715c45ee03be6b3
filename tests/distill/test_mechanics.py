"""The shared training mechanics: parameter groups, the optimizer step, the finiteness check, the atomic
directory write, stable hashes."""

import hashlib

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from distill.corpus import in_validation, stable_hash
from distill.mechanics import (
    DTYPES,
    NonFiniteLoss,
    OptimizerStep,
    adamw,
    atomic_directory,
    parameter_groups,
    require_finite,
)
from distill.recipes import RecipeError


def tiny_bert():
    return BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=16, max_position_embeddings=16))


def test_parameter_groups_decay_matrices_only_and_give_the_head_its_rate():
    model = tiny_bert()
    decay, no_decay, head = parameter_groups(model, 0.01, head="cls.", head_lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and not names[id(p)].startswith("cls.") for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert head["lr"] == 1e-3 and head["weight_decay"] == 0.0
    assert {names[id(p)] for p in head["params"]} == {"cls.predictions.bias", "cls.predictions.transform.dense.weight",
                                                      "cls.predictions.transform.dense.bias",
                                                      "cls.predictions.transform.LayerNorm.weight",
                                                      "cls.predictions.transform.LayerNorm.bias"}
    # the decoder is tied to the word embeddings: it trains once, with the body
    every = [id(p) for g in (decay, no_decay, head) for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))
    assert id(model.bert.embeddings.word_embeddings.weight) in {id(p) for p in decay["params"]}


def test_optimizer_step_clips_steps_schedules_and_zeroes():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = adamw(parameter_groups(model, 0.0), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    step = OptimizerStep(optimizer, scheduler, max_grad_norm=1e-3)
    before = model.weight.detach().clone()
    (1000 * model(torch.ones(2, 4)).sum()).backward()
    norm = step(model.parameters())
    assert norm > 1e-3  # the norm before clipping
    assert model.weight.grad is None and scheduler.get_last_lr() == [0.05, 0.05]
    assert not torch.equal(model.weight, before)
    # discard: no update
    (model(torch.ones(2, 4)).sum()).backward()
    after = model.weight.detach().clone()
    step.discard()
    assert model.weight.grad is None and torch.equal(model.weight, after)


def test_optimizer_step_with_a_grad_scaler_unscales_before_clipping():
    model = torch.nn.Linear(4, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step = OptimizerStep(torch.optim.SGD(model.parameters(), lr=0.0), None, 1e9, scaler=scaler)
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    norm = step(model.parameters())
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]).norm()  # d/dw = x = 1, d/db = 1: unscaled
    assert float(norm) == pytest.approx(float(expected))


def test_require_finite_names_the_step_and_the_values():
    require_finite({"total": 1.0, "ce": 0.5}, 3, "hint")
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 7 \(total nan, ce 0\.5\); stopped without "
                                           r"updating\. lower the lr") as e:
        require_finite({"total": float("nan"), "ce": 0.5}, 7, "lower the lr")
    assert isinstance(e.value, FloatingPointError) and e.value.values["ce"] == 0.5
    with pytest.raises(NonFiniteLoss, match="loss inf"):
        require_finite(float("inf"), 1, "")


def test_atomic_directory_replaces_on_success_and_keeps_the_old_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one" and not tmp.exists()
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "one" and not tmp.exists()
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_stable_hashes_are_the_ones_the_splits_were_made_with():
    # the topic task's split (md5 of the title) and the corpus split and masking seeds (64-bit blake2b)
    assert stable_hash("Paris", "md5") == int(hashlib.md5(b"Paris").hexdigest(), 16)
    assert stable_hash("some text") == int.from_bytes(hashlib.blake2b(b"some text", digest_size=8).digest(), "big")
    assert in_validation("some text", 0.5) == (stable_hash("some text") % 1_000_000 < 500_000)


def test_one_precision_table():
    assert DTYPES["bf16"] is DTYPES["bfloat16"] is torch.bfloat16 and DTYPES["fp32"] is torch.float32


def test_cpu_threads_follow_the_cores_this_process_may_use(monkeypatch):
    """A job pinned to some cores (taskset, a SLURM cpuset) runs that many threads, shared by its processes."""
    import os
    from types import SimpleNamespace

    from distill import mechanics

    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "ACCELERATE_MIXED_PRECISION", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    try:
        if hasattr(os, "sched_getaffinity"):
            assert mechanics.available_cores() == len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7, 9}, raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 128)
        assert mechanics.available_cores() == 4
        for processes, threads in ((1, 4), (2, 2), (8, 1)):
            mechanics.share_cpu_cores(SimpleNamespace(device=torch.device("cpu"), num_processes=processes))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_honour_the_recipe_then_a_users_omp_num_threads_then_share_the_cores(monkeypatch, caplog):
    """Two jobs started side by side with OMP_NUM_THREADS=1 run one thread each (the kit used to override it with
    the share of all cores: 2 x 2 threads on 2 cores); the recipe's train.cpu_threads wins over everything; under
    `accelerate launch`, whose OMP_NUM_THREADS=1 is its own default, the cores are shared; oversubscribing the
    cores gets one warning line."""
    import logging
    import os
    from types import SimpleNamespace

    from distill import mechanics

    cpu = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for name in ("OMP_NUM_THREADS", "ACCELERATE_MIXED_PRECISION", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    try:
        assert mechanics.cpu_threads(1) == (4, "4 cores this process may use / 1 processes")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert mechanics.cpu_threads(1) == (1, "OMP_NUM_THREADS")
        with caplog.at_level(logging.INFO, logger="distill.mechanics"):
            assert mechanics.share_cpu_cores(cpu) == 1 == torch.get_num_threads()
        assert "CPU: 1 thread per process (OMP_NUM_THREADS)" in caplog.text
        assert mechanics.cpu_threads(1, requested=3) == (3, "train.cpu_threads")
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # started by accelerate launch: its OMP_NUM_THREADS
        assert mechanics.cpu_threads(2) == (2, "4 cores this process may use / 2 processes")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # this machine's processes, not the world's
        assert mechanics.share_cpu_cores(SimpleNamespace(device=torch.device("cpu"), num_processes=8)) == 1
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distill.mechanics"):
            assert mechanics.share_cpu_cores(cpu, requested=2) == 2 == torch.get_num_threads()
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warned == ["4 processes x 2 threads (train.cpu_threads) exceed the 4 cores this process may use: "
                          "steps will be slower than with fewer threads"]
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
        for bad in ("0", "two", "-1"):
            monkeypatch.setenv("OMP_NUM_THREADS", bad)
            with pytest.raises(RecipeError, match=f"OMP_NUM_THREADS='{bad}' is not a positive number of threads"):
                mechanics.cpu_threads(1)
        # a GPU run leaves the threads alone
        torch.set_num_threads(3)
        assert mechanics.share_cpu_cores(SimpleNamespace(device=torch.device("cuda"), num_processes=1)) == 3
    finally:
        torch.set_num_threads(before)


def test_train_cpu_threads_must_be_positive():
    from distill.recipes import FinetuneTrainConfig, TrainConfig

    assert TrainConfig(cpu_threads=2).cpu_threads == 2 and TrainConfig().cpu_threads is None
    for config in (TrainConfig, FinetuneTrainConfig):
        with pytest.raises(RecipeError, match=r"train.cpu_threads must be > 0 \(or null"):
            config(cpu_threads=0)


def test_latency_has_at_least_three_blocks_per_model_even_for_slow_calls():
    import time

    from distill.mechanics import latency

    def slow(ids, mask):  # longer than a block's minimum run time: one block per round
        time.sleep(0.06)

    def fast(ids, mask):
        return ids.sum()

    out = latency({"slow": slow, "fast": fast}, [1], repeats=1, seq_len=4)
    assert out["slow"][1].blocks >= 3 and out["fast"][1].blocks >= 3
    assert out["slow"][1].median >= 60 and out["slow"][1].iqr >= 0
