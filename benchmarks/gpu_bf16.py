"""bf16 GPU benchmark: distillation-step throughput, ours vs the reference's step, and student latency.

    python benchmarks/gpu_bf16.py                   # on a CUDA GPU; writes --json if given
    python benchmarks/gpu_bf16.py --device cpu --shape tiny --steps 2 --warmup 1    # smoke test
    python benchmarks/gpu_bf16.py --impls ours --compile-loss --no-latency          # compiled soft targets

Shape bert-base: a 12 x 768 BERT teacher -> 6 x 768 DistilBERT student initialised from teacher layers
[0, 2, 4, 7, 9, 11], real 30,522-token vocabulary, random weights (timing does not depend on values).
Batches: random token ids, B sequences of up to L tokens (lengths uniform in [L/2, L], padded), 15% of
the real tokens masked. Mixed precision as Accelerate's `mixed_precision: bf16` runs it: fp32 master
weights under bf16 autocast, the teacher stored in bf16 (`teacher.dtype: bfloat16`), fused AdamW.

- ours: the trainer's own step (distill.train.DistillationModel + teacher_tensors): fused, chunked
  soft-target/MLM losses that never build B x T x V logits.
- reference: the original `distillation/` step, run with today's transformers classes
  (`DistilBertForMaskedLM` student with the same weights, `BertForMaskedLM` teacher): full B x T x V
  logits for both, rows picked with a mask, KLDiv(batchmean)·T², MLM CE, CosineEmbeddingLoss on the last
  hidden states.
Both with the paper's weights (5, 2, 1), T = 2, soft targets on all real tokens ("all") or only the
masked ones ("masked"). Peak memory is torch.cuda.max_memory_allocated over the timed steps.
Latency: our DistilBERTModel vs transformers' DistilBertModel, bf16 weights, inference_mode, seq 128.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import BertConfig, BertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.recipes import LossConfig  # noqa: E402
from distill.train import DistillationModel, layer_pairs, optimizer_groups, scored_rows, teacher_tensors  # noqa: E402
from students.init import default_layers, init_from_teacher  # noqa: E402
from students.modeling import DistilBERTModel  # noqa: E402
from teachers.teacher import Teacher  # noqa: E402

SHAPES = {
    "tiny": dict(hidden=32, heads=2, ffn=64, teacher_layers=2, student_layers=1),
    "bert-base": dict(hidden=768, heads=12, ffn=3072, teacher_layers=12, student_layers=6),
}
VOCAB, MASK_ID, T = 30522, 103, 2.0


def batches(n: int, B: int, L: int, device: torch.device, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None] < lengths[:, None]).long()
        ids = torch.randint(1000, VOCAB, (B, L), generator=g) * mask
        ids[:, 0] = 101
        picked = (torch.rand(B, L, generator=g) < 0.15) & mask.bool()
        picked[:, 0] = False
        labels = torch.where(picked, ids, torch.full_like(ids, -100))
        ids = torch.where(picked, torch.full_like(ids, MASK_ID), ids)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, data, warmup: int, device: torch.device) -> dict:
    for b in data[:warmup]:
        step(b)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for b in data[warmup:]:
        t0 = time.perf_counter()
        step(b)
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens += int(b["attention_mask"].sum())
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": round(tokens / sum(times), 1), "median_step_ms": round(1e3 * statistics.median(times), 2),
            "peak_mem_mib": round(peak, 1)}


def make_models(shape: str, device: torch.device):
    s = SHAPES[shape]
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(hidden_size=s["hidden"], num_attention_heads=s["heads"],
                                      intermediate_size=s["ffn"], num_hidden_layers=s["teacher_layers"],
                                      attn_implementation="sdpa"))
    student = init_from_teacher(bert, default_layers(s["teacher_layers"], s["student_layers"]))
    bert = bert.to(device, torch.bfloat16).eval().requires_grad_(False)
    return bert, student.to(device), s


def sdpa_config(config: transformers.DistilBertConfig) -> transformers.DistilBertConfig:
    """Our student's config (a DistilBertConfig) for transformers' own classes, with SDPA attention."""
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    return config


def ours(shape: str, mode: str, data, warmup: int, device: torch.device, compile_loss: bool = False) -> dict:
    bert, student, s = make_models(shape, device)
    teacher = Teacher(bert)
    cfg = LossConfig(restrict_ce_to_mask=(mode == "masked"))
    pairs = layer_pairs(cfg, s["student_layers"], s["teacher_layers"])
    model = DistillationModel(student, s["hidden"], cfg, pairs, compile_loss).to(device).train()
    opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)

    def step(b):
        rows = scored_rows(b, cfg.restrict_ce_to_mask)
        n = torch.stack([rows.sum(), (b["labels"] != -100).sum(), b["attention_mask"].sum()]).tolist()
        norm = {"rows": float(n[0]), "mlm": float(n[1]), "tokens": float(n[2])}  # as the trainer (one sync)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            t = teacher_tensors(teacher, b, rows, cfg, pairs)
            losses = model(b, rows, t, norm)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, data, warmup, device)


def reference(shape: str, mode: str, data, warmup: int, device: torch.device, compile_loss: bool = False) -> dict:
    bert, ours_student, s = make_models(shape, device)
    student = transformers.DistilBertForMaskedLM(sdpa_config(ours_student.config))
    student.load_state_dict(ours_student.state_dict())
    student.to(device).train()
    del ours_student
    opt = torch.optim.AdamW(optimizer_groups(student, 0.0), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)

    def step(b):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            s_out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            with torch.no_grad():
                t_out = bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            sel = (b["labels"] != -100) if mode == "masked" else b["attention_mask"].bool()
            s_sel = s_out.logits[sel]  # (N, V): B x T x V logits were built first, as the reference does
            t_sel = t_out.logits[sel]
            ce = F.kl_div(F.log_softmax(s_sel / T, -1), F.softmax(t_sel / T, -1), reduction="batchmean") * T * T
            mlm = F.cross_entropy(s_out.logits.view(-1, VOCAB), b["labels"].view(-1), ignore_index=-100)
            real = b["attention_mask"].bool()
            hs, ht = s_out.hidden_states[-1][real], t_out.hidden_states[-1][real]
            cos = F.cosine_embedding_loss(hs, ht, hs.new_ones(hs.shape[0]))
            loss = 5.0 * ce + 2.0 * mlm + 1.0 * cos
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, data, warmup, device)


@torch.inference_mode()
def latency(shape: str, batch: int, runs: int, device: torch.device) -> dict:
    _, student, _ = make_models(shape, device)
    mine = DistilBERTModel(student.config)
    mine.load_state_dict(student.distilbert.state_dict())
    theirs = transformers.DistilBertModel(sdpa_config(student.config))
    theirs.load_state_dict(student.distilbert.state_dict())
    ids = torch.randint(1000, VOCAB, (batch, 128), device=device)
    mask = torch.ones_like(ids)
    result = {}
    models = {"ours": mine.to(device, torch.bfloat16).eval(), "transformers": theirs.to(device, torch.bfloat16).eval()}
    samples = {k: [] for k in models}
    for _ in range(3):  # warm-up
        for m in models.values():
            m(ids, mask)
    for _ in range(runs):  # interleaved rounds
        for name, m in models.items():
            sync(device)
            t0 = time.perf_counter()
            m(input_ids=ids, attention_mask=mask)
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    for name, xs in samples.items():
        result[name] = round(1e3 * statistics.median(xs), 3)
    result["ratio"] = round(result["ours"] / result["transformers"], 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=list(SHAPES), default="bert-base")
    p.add_argument("--batches", default="32x128,32x512", help="comma-separated BxL settings")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--impls", default="ours,reference", help="which steps to time: ours, reference")
    p.add_argument("--compile-loss", action="store_true", help="ours with train.compile_loss: true")
    p.add_argument("--no-latency", action="store_true", help="skip the inference latency comparison")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, transformers {transformers.__version__}, shape {args.shape}")
    results = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
               "shape": args.shape, "compile_loss": args.compile_loss, "steps": []}
    impls = {"ours": ours, "reference": reference}
    for setting in args.batches.split(","):
        B, L = map(int, setting.split("x"))
        data = batches(args.warmup + args.steps, B, L, device)
        for mode in ("all", "masked"):
            for impl in args.impls.split(","):
                try:
                    r = impls[impl](args.shape, mode, data, args.warmup, device, args.compile_loss)
                except torch.OutOfMemoryError:
                    r = {"error": "out of memory"}
                r = {"impl": impl, "mode": mode, "batch": setting, **r}
                results["steps"].append(r)
                print(json.dumps(r), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    for batch in () if args.no_latency else (1, 32):
        r = {"latency_batch": batch, "seq": 128, **latency(args.shape, batch, 50 if device.type == "cuda" else 3,
                                                          device)}
        results.setdefault("latency_ms", []).append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
