"""Checkpoints: no pickle, verified by their manifest, damaged ones set aside for the previous complete one."""

import json
import os
import pickle

import pytest
import torch
import transformers

from distill import checkpoint


class Evil:
    """Unpickling this runs a command (what a crafted file in a shared run directory would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def parts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied, as the student's vocabulary projector
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = transformers.get_linear_schedule_with_warmup(opt, 2, 10)
    for _ in range(3):
        model(torch.tensor([1, 2, 3])).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return checkpoint.Parts(model, opt, sched)


def snapshot(p):
    weights = {k: v.clone() for k, v in p.model.state_dict().items()}
    return weights, p.optimizer.state_dict()["state"][0]["exp_avg"].clone(), p.scheduler.get_last_lr(), \
        torch.get_rng_state()


def test_roundtrip_restores_every_part_and_holds_no_pickle(tmp_path):
    p = parts()
    torch.manual_seed(7)
    (tmp_path / "checkpoints" / "step-00000002.tmp").mkdir(parents=True)  # a save that a kill interrupted
    checkpoint.save(p, tmp_path, 3, {"tokens": 5}, keep=2)
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]
    model_before, avg_before, lr_before, rng_before = snapshot(p)
    expected_draw = torch.rand(3)
    q = parts()  # other weights; then a step further
    q.scheduler.step()
    state = checkpoint.restore(tmp_path, q)
    assert state == {"tokens": 5, "step": 3}
    model_after, avg_after, lr_after, rng_after = snapshot(q)
    for k in model_before:
        assert torch.equal(model_before[k], model_after[k]), k
    assert torch.equal(avg_before, avg_after) and lr_before == lr_after and torch.equal(rng_before, rng_after)
    assert torch.equal(torch.rand(3), expected_draw)
    files = {f.name for f in (tmp_path / "checkpoints" / "step-00000003").iterdir()}
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    manifest = json.loads((tmp_path / "checkpoints" / "step-00000003" / "manifest.json").read_text())
    assert set(manifest["files"]) == files - {"manifest.json"}


FILES = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng-0.safetensors",
         "rng-0.json", "trainer_state.json", "manifest.json"]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("rewrite_manifest", [False, True])
def test_a_pickle_planted_in_any_file_never_runs(tmp_path, name, rewrite_manifest):
    """Each file replaced by a malicious pickle, with the manifest left alone or recomputed to match (an
    attacker who rewrites it too): the checkpoint is refused, never unpickled."""
    marker = tmp_path / "pwned"
    p = parts()
    checkpoint.save(p, tmp_path, 2, {}, keep=5)
    checkpoint.save(p, tmp_path, 4, {}, keep=5)
    ckpt = tmp_path / "checkpoints" / "step-00000004"
    (ckpt / name).write_bytes(pickle.dumps(Evil(marker)))
    for legacy in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (ckpt / legacy).write_bytes(pickle.dumps(Evil(marker)))
    if rewrite_manifest and name != "manifest.json":
        files = {f.name: {"size": f.stat().st_size, "sha256": checkpoint.file_sha256(f)}
                 for f in ckpt.iterdir() if f.name != "manifest.json"}
        manifest = json.loads((ckpt / "manifest.json").read_text())
        (ckpt / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    warnings = []
    state = checkpoint.restore(tmp_path, parts(), warn=warnings.append)
    assert not marker.exists()
    assert state["step"] == 2  # fell back to the previous checkpoint
    assert len(warnings) == 1 and "step-00000004" in warnings[0]
    assert (tmp_path / "checkpoints" / "step-00000004.damaged").is_dir()  # kept for inspection
    assert [d.name for d in checkpoint.checkpoint_dirs(tmp_path)] == ["step-00000002"]


def test_no_usable_checkpoint_is_one_error_and_old_pickle_checkpoints_are_not_loaded(tmp_path):
    p = parts()
    checkpoint.save(p, tmp_path, 1, {}, keep=5)
    (tmp_path / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint.*step-00000001: model.safetensors"):
        checkpoint.restore(tmp_path, parts())
    legacy = tmp_path / "old"
    (legacy / "checkpoints" / "step-00000005").mkdir(parents=True)
    (legacy / "checkpoints" / "step-00000005" / "trainer_state.json").write_text('{"step": 5}')
    (legacy / "checkpoints" / "step-00000005" / "random_states_0.pkl").write_bytes(pickle.dumps(Evil(tmp_path / "x")))
    with pytest.raises(checkpoint.CheckpointError, match="earlier version's checkpoint"):
        checkpoint.restore(legacy, parts())
    assert not (tmp_path / "x").exists()
    assert checkpoint.restore(tmp_path / "empty", parts()) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra-world"])
def test_damage_is_detected_before_anything_is_applied(tmp_path, damage):
    p = parts()
    checkpoint.save(p, tmp_path, 1, {}, keep=5)
    f = tmp_path / "checkpoints" / "step-00000001" / "optimizer.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "delete":
        f.unlink()
    q = parts()
    q.model[0].weight.data.add_(1.0)
    before = q.model[0].weight.detach().clone()
    if damage == "extra-world":
        q.world = 2  # saved by one process, resumed by two: refused, not half-restored
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(tmp_path, q)
    assert torch.equal(q.model[0].weight, before)  # nothing applied
    assert (tmp_path / "checkpoints" / "step-00000001").is_dir()  # nothing renamed when none is usable
    assert "optimizer.safetensors" in str(e.value) if damage != "extra-world" else "this run has 2" in str(e.value)
