"""Distillation-step throughput (real tokens/s) and peak memory, with the trainer's own step.

    python benchmarks/distill_throughput.py                      # all shapes, both soft-target modes
    python benchmarks/distill_throughput.py --shape minilm-3 --steps 20

Shapes (random weights; timing does not depend on their values):
  tiny       2 x 32 teacher     -> 1 x 32 student
  minilm-3   6 x 384 (MiniLM)   -> 3 x 384 student    (the setting of the "numbers to beat")
  bert-base  12 x 768 BERT-base -> 6 x 768 DistilBERT
Data: batches of `--batch` Wikipedia summaries (documents up to 512 tokens, length-grouped, as the
reference trains), masked with the paper's smoothing. Each shape runs in its own subprocess so that peak
RSS (ru_maxrss) is per shape. Mode "all": soft-target loss on every real token; "masked": only on the
masked tokens (`restrict_ce_to_mask`). fp32 unless --bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden=32, heads=2, ffn=64, teacher_layers=2, student_layers=1),
    "minilm-3": dict(hidden=384, heads=12, ffn=1536, teacher_layers=6, student_layers=3),
    "bert-base": dict(hidden=768, heads=12, ffn=3072, teacher_layers=12, student_layers=6),
}


def run_shape(shape: str, mode: str, batch: int, steps: int, warmup: int, bf16: bool, compile_loss: bool) -> dict:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from distill.data import GlobalBatchSampler, build_corpus, token_counts, train_loader
    from distill.recipes import DataConfig, LossConfig, MaskingConfig
    from distill.train import DistillationModel, layer_pairs, optimizer_groups, scored_rows, teacher_tensors
    from students.init import default_layers, init_from_teacher
    from students.tokenizer import get_tokenizer
    from teachers.teacher import Teacher

    torch.manual_seed(0)
    s = SHAPES[shape]
    tokenizer = get_tokenizer("distilbert-base-uncased")
    corpus = build_corpus(DataConfig(max_length=512, packing=False, num_proc=2), tokenizer)
    from distill.masking import MLMCollator

    collator = MLMCollator(tokenizer, MaskingConfig(), token_counts(corpus.train, len(tokenizer), 10**7))
    loader = iter(train_loader(corpus.train, GlobalBatchSampler(corpus.train["length"], batch, 0, True),
                               collator, 0, 1))
    bert = BertForMaskedLM(BertConfig(hidden_size=s["hidden"], num_attention_heads=s["heads"],
                                      intermediate_size=s["ffn"], num_hidden_layers=s["teacher_layers"]))
    teacher = Teacher(bert)
    student = init_from_teacher(teacher, default_layers(s["teacher_layers"], s["student_layers"]))
    cfg = LossConfig(restrict_ce_to_mask=(mode == "masked"))
    pairs = layer_pairs(cfg, s["student_layers"], s["teacher_layers"])
    model = DistillationModel(student, s["hidden"], cfg, pairs, compile_loss).train()
    opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    times, tokens = [], []
    for i in range(warmup + steps):
        b = next(loader)
        t0 = time.perf_counter()
        rows = scored_rows(b, cfg.restrict_ce_to_mask)
        norm = {"rows": float(rows.sum()), "mlm": float((b["labels"] != -100).sum()),
                "tokens": float(b["attention_mask"].sum())}
        with autocast:
            t = teacher_tensors(teacher, b, rows, cfg, pairs)
            losses = model(b, rows, t, norm)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(norm["tokens"])
    tps = sum(tokens) / sum(times)
    return {"shape": shape, "mode": mode, "batch": batch, "steps": steps, "tokens_per_s": round(tps, 1),
            "median_step_s": round(statistics.median(times), 4), "mean_tokens_per_step": sum(tokens) / len(tokens),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": torch.get_num_threads(), "bf16": bf16, "compile_loss": compile_loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), action="append")
    p.add_argument("--mode", choices=["all", "masked"], action="append")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true", help="compiled soft-target arithmetic (train.compile_loss: true)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    shapes, modes = args.shape or list(SHAPES), args.mode or ["all", "masked"]
    if args.child:
        print(json.dumps(run_shape(shapes[0], modes[0], args.batch, args.steps, args.warmup, args.bf16,
                                   args.compile)))
        return
    root = Path(__file__).resolve().parents[1]
    for shape in shapes:
        for mode in modes:
            steps = args.steps if shape != "bert-base" else max(3, args.steps // 4)
            cmd = [sys.executable, __file__, "--child", "--shape", shape, "--mode", mode, "--batch", str(args.batch),
                   "--steps", str(steps), "--warmup", str(args.warmup)] + (["--bf16"] if args.bf16 else []) + (
                ["--compile"] if args.compile else [])
            out = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode:
                print(f"{shape}/{mode}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['shape']:10s} {r['mode']:6s} batch {r['batch']:3d}: {r['tokens_per_s']:9.1f} tokens/s  "
                  f"median step {r['median_step_s']:.3f} s  ({r['mean_tokens_per_step']:.0f} tokens/step)  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB  threads {r['threads']}  compiled loss {r['compile_loss']}")


if __name__ == "__main__":
    main()
