"""FSDP2 (torch's fully_shard, 2 CPU processes) against one unsharded process, and exact resume of a
sharded run from a distill.checkpoint checkpoint (gathered on save, re-sharded on load)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.cli import ROOT, TINY, kit, launch, python

pytestmark = pytest.mark.slow


def torchrun(n, *args):
    python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n,
           ROOT / "tests" / "distill" / "fsdp_worker.py", *args, OMP_NUM_THREADS="1")


def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    torchrun(1, one, "train", "plain")
    torchrun(2, two, "train", "fsdp")
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints", resumed / "checkpoints")
    torchrun(2, resumed, "resume", "fsdp")

    l1 = json.loads((one / "losses-train-plain.json").read_text())
    l2 = json.loads((two / "losses-train-fsdp.json").read_text())
    assert l1.keys() == l2.keys() == {"1", "2", "3", "4"}
    for s in l1:  # sharded reductions sum in another order: float32 rounding only
        assert l2[s] == pytest.approx(l1[s], rel=1e-5), (s, l1, l2)
    w1, w2 = load_file(str(one / "final-train-plain.safetensors")), load_file(str(two / "final-train-fsdp.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)

    # resumed from step 2 by two sharded processes: steps 3 and 4 are bit-identical to the uninterrupted run
    lr = json.loads((resumed / "losses-resume-fsdp.json").read_text())
    assert lr == {"3": l2["3"], "4": l2["4"]}
    wr = load_file(str(resumed / "final-resume-fsdp.safetensors"))
    assert max((wr[k] - w2[k]).abs().max().item() for k in w2) == 0.0
    manifest = json.loads((two / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    assert manifest["world"] == 2 and {"rng-0.json", "rng-1.json"} <= set(manifest["files"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Accelerate applies FSDP on GPUs only")
def test_accelerate_fsdp_run_matches_the_unsharded_run_on_a_gpu(tiny_teacher_dir, tmp_path):
    """The trainer through recipes/accelerate/fsdp.yaml (one GPU is enough for FSDP's code paths) against the
    same recipe without FSDP: equal losses within fp32 reduction-order rounding, and the run resumes."""
    from tests.distill.test_train import losses

    n = torch.cuda.device_count()
    args = [TINY, f"teacher.name_or_path={tiny_teacher_dir}", "train.max_steps=4", "train.log_every=1",
            "student.dropout=0.0", "train.eval_every=100", "train.compile=false", "train.save_every=2"]
    kit(*args, f"output_dir={tmp_path / 'plain'}")
    sharded = ["--config_file", ROOT / "recipes" / "accelerate" / "fsdp.yaml", "--num_processes", n,
               "--mixed_precision", "no", "distill/run.py", *args, f"output_dir={tmp_path / 'fsdp'}"]
    launch(*sharded, cpu=False)
    l1, l2 = losses(tmp_path / "plain"), losses(tmp_path / "fsdp")
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-4), (s, l1, l2)
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-00000004")
    launch(*sharded, cpu=False)
    assert losses(tmp_path / "fsdp")[4] == pytest.approx(l2[4], rel=1e-6)
