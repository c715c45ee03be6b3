"""Distillation-step benchmark: the product's step against the original `distillation/` step.

    python benchmarks/distill_step.py --device cuda --quick --json out.json   # one GPU, <= 5 minutes
    python benchmarks/distill_step.py --device cuda                           # more steps per setting
    python benchmarks/distill_step.py --device cpu                            # the CPU shapes
    python benchmarks/distill_step.py --device cpu --shape minilm-3 --mode all --impls ours

"ours" is the trainer's own step — `distill.step.DistillationStep` through Accelerate, with the recipe
defaults for the device (CUDA: bf16 autocast, teacher in bf16, compiled blocks, Triton vocabulary kernel;
CPU: fp32, eager), the next batch prepared before the step's one device read, as the trainer does.
"reference" is the original step with today's transformers classes: `DistilBertForMaskedLM` student with the
same weights and `BertForMaskedLM` teacher (SDPA), full B x T x V logits for both, rows picked with a mask,
KLDiv(batchmean)·T², MLM cross-entropy, CosineEmbeddingLoss on the last layer. Both: the paper's weights
(5, 2, 1), T = 2, soft targets on all real tokens ("all") or only the masked ones ("masked"), fused AdamW,
gradient clipping.

Printed per setting: tokens/s (real tokens), median step, model TFLOP/s and MFU (distill.flops: the same
count for both steps, so their MFU ratio is their speed ratio), peak memory (GPU: max_memory_allocated,
each implementation's models alone on the card; CPU: peak RSS of its own subprocess).

Data. cuda: random token batches, B sequences of L tokens, "packed" (all L tokens real, as packed blocks)
or "padded" (real lengths uniform in [L/2, L]), 15 % of the real tokens masked. cpu: batches of `--batch`
Wikipedia summaries (documents up to 512 tokens, length-grouped, masked with the paper's smoothing).
Weights are random: the time of a step does not depend on their values.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.flops import peak_tflops  # noqa: E402
from distill.mechanics import OptimizerStep, adamw, parameter_groups, peak_rss_mb  # noqa: E402
from distill.recipes import LossConfig  # noqa: E402
from distill.step import DistillationModel, DistillationStep, compile_blocks, layer_pairs  # noqa: E402

SHAPES = {
    "tiny": dict(hidden=32, heads=2, ffn=64, teacher_layers=2, student_layers=1),
    "minilm-3": dict(hidden=384, heads=12, ffn=1536, teacher_layers=6, student_layers=3),
    "bert-base": dict(hidden=768, heads=12, ffn=3072, teacher_layers=12, student_layers=6),
}
VOCAB, MASK_ID, T = 30522, 103, 2.0
GPU_BATCHES = ["32x128", "128x128", "32x512", "128x512"]


# ------------------------------------------------------------------------------------------ data
def random_batches(n: int, B: int, L: int, packed: bool, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.full((B,), L) if packed else torch.randint(L // 2, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None] < lengths[:, None]).long()
        ids = torch.randint(1000, VOCAB, (B, L), generator=g) * mask
        ids[:, 0] = 101
        picked = (torch.rand(B, L, generator=g) < 0.15) & mask.bool()
        picked[:, 0] = False
        labels = torch.where(picked, ids, torch.full_like(ids, -100))
        ids = torch.where(picked, torch.full_like(ids, MASK_ID), ids)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def wiki_batches(n: int, batch: int) -> list[dict[str, torch.Tensor]]:
    from distill.batching import GlobalBatchSampler, train_loader
    from distill.corpus import build_corpus, token_frequencies
    from distill.masking import MLMCollator
    from distill.recipes import DataConfig, MaskingConfig
    from students.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("distilbert-base-uncased")
    corpus = build_corpus(DataConfig(max_length=512, packing=False, num_proc=2), tokenizer)
    collator = MLMCollator(tokenizer, MaskingConfig(), token_frequencies(corpus.train, len(tokenizer), 10**7))
    loader = iter(train_loader(corpus.train, GlobalBatchSampler(corpus.train["length"], batch, 0, True),
                               collator, 0, 1))
    return [next(loader) for _ in range(n)]


# ------------------------------------------------------------------------------------------ models
def make_models(shape: str, device: torch.device, teacher_dtype: torch.dtype):
    from transformers import BertConfig, BertForMaskedLM

    from students.init import default_layers, init_from_teacher

    s = SHAPES[shape]
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(hidden_size=s["hidden"], num_attention_heads=s["heads"],
                                      intermediate_size=s["ffn"], num_hidden_layers=s["teacher_layers"],
                                      attn_implementation="sdpa"))
    student = init_from_teacher(bert, default_layers(s["teacher_layers"], s["student_layers"]))
    return bert.to(teacher_dtype).eval().requires_grad_(False), student, s


def profile(one, data: list, path: str) -> None:
    """torch.profiler over two more steps: the top kernels by device time and ops by host time, appended to
    `path`, with the device-busy share of the wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sync(torch.device("cuda"))
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(2):
            one(i)
        sync(torch.device("cuda"))
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    with open(path, "a") as f:
        f.write(f"\n### {data[0]['input_ids'].shape}: wall {1e3 * wall:.1f} ms for 2 steps, device busy "
                f"{device_us / 1e3:.1f} ms ({100 * device_us / 1e6 / wall:.0f} %)\n")
        f.write(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))


class Ours:
    """The product's step for one shape; `run(mode, data)` times it for a soft-target mode."""

    def __init__(self, shape: str, device: torch.device, mixed_precision: str, compile: bool, kernel: str,
                 dynamic: bool | None = True, teacher_autocast: bool | None = None):
        from accelerate import Accelerator

        from teachers.teacher import Teacher

        self.device, self.kernel = device, kernel
        half = mixed_precision != "no"
        bert, self.student, self.s = make_models(shape, device, torch.bfloat16 if half else torch.float32)
        self.teacher = Teacher(bert).to(device)
        if compile:
            compile_blocks([*self.student.distilbert.transformer.layer, *self.teacher.blocks], dynamic)
        self.teacher_autocast = teacher_autocast
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
        self.peak = peak_tflops(device, mixed_precision)
        self.profile: str | None = None

    def step_for(self, mode: str) -> DistillationStep:
        cfg = LossConfig(restrict_ce_to_mask=mode == "masked")
        pairs = layer_pairs(cfg, self.s["student_layers"], self.s["teacher_layers"])
        model = DistillationModel(self.student, self.s["hidden"], cfg, pairs, self.kernel).train()
        # lr 0: the update still runs in full; the weights stay where they are across settings
        opt = adamw(parameter_groups(model, 0.0), 0.0, (0.9, 0.98), 1e-6, fused=True)
        model, opt = self.accelerator.prepare(model, opt)
        return DistillationStep(self.accelerator, model, self.teacher, opt, clip_grad_norm=5.0,
                                teacher_autocast=self.teacher_autocast)

    def run(self, mode: str, data: list, warmup: int) -> dict:
        step = self.step_for(mode)
        flops = []
        source = [iter(data)]

        def one(i: int) -> None:
            if i == 0:  # each pass over the data (timing, profiling) reads it from the start
                source[0] = iter(data)
            flops.append(step.next_step(source[0], last=i + 1 == len(data)).flops)

        result = timed(one, data, warmup, self.device)
        result.update(model_flops(flops[warmup:], result, self.peak))
        if self.profile:
            profile(one, data, self.profile)
        self.accelerator.free_memory()
        return result

    def close(self) -> None:
        del self.student, self.teacher
        self.accelerator.free_memory()


class Reference:
    """The original `distillation/` step with transformers' classes (module docstring)."""

    def __init__(self, shape: str, device: torch.device, mixed_precision: str, *_):
        import transformers

        self.device, self.half = device, mixed_precision != "no"
        self.bert, ours_student, self.s = make_models(shape, device, torch.bfloat16 if self.half else torch.float32)
        config = ours_student.config.__class__.from_dict(ours_student.config.to_dict())
        config._attn_implementation = "sdpa"
        self.student = transformers.DistilBertForMaskedLM(config)
        self.student.load_state_dict(ours_student.state_dict())
        self.student.to(device).train()
        self.bert.to(device)
        self.peak = peak_tflops(device, mixed_precision)
        from distill.step import encoder_shape

        self.shapes = dict(teacher=encoder_shape(self.bert.config), student=encoder_shape(config), vocab=VOCAB,
                           pairs=layer_pairs(LossConfig(), self.s["student_layers"], self.s["teacher_layers"]),
                           projected=[])

    def run(self, mode: str, data: list, warmup: int) -> dict:
        from distill.flops import step_flops

        student, bert, device = self.student, self.bert, self.device
        cfg = LossConfig(restrict_ce_to_mask=mode == "masked")
        opt = OptimizerStep(adamw(parameter_groups(student, 0.0), 0.0, (0.9, 0.98), 1e-6, fused=True), None, 5.0)
        flops = []

        def one(i: int) -> None:
            b = {k: v.to(device, non_blocking=True) for k, v in data[i].items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.half):
                s_out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                output_hidden_states=True)
                with torch.no_grad():
                    t_out = bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 output_hidden_states=True)
                sel = (b["labels"] != -100) if mode == "masked" else b["attention_mask"].bool()
                s_sel = s_out.logits[sel]  # (N, V): B x T x V logits were built first, as the original step does
                t_sel = t_out.logits[sel]
                ce = F.kl_div(F.log_softmax(s_sel / T, -1), F.softmax(t_sel / T, -1), reduction="batchmean") * T * T
                mlm = F.cross_entropy(s_out.logits.view(-1, VOCAB), b["labels"].view(-1), ignore_index=-100)
                real = b["attention_mask"].bool()
                hs, ht = s_out.hidden_states[-1][real], t_out.hidden_states[-1][real]
                cos = F.cosine_embedding_loss(hs, ht, hs.new_ones(hs.shape[0]))
                loss = 5.0 * ce + 2.0 * mlm + 1.0 * cos
            loss.backward()
            opt(student.parameters())  # clip -> step -> zero, as the product's step
            lengths = data[i]["attention_mask"].sum(1).double()
            rows = int(lengths.sum()) if mode == "all" else int((data[i]["labels"] != -100).sum())
            flops.append(step_flops(loss_cfg=cfg, n_tokens=float(lengths.sum()), sum_sq_len=float((lengths**2).sum()),
                                    n_rows=rows, **self.shapes)["total"])

        result = timed(one, data, warmup, device)
        result.update(model_flops(flops[warmup:], result, self.peak))
        return result

    def close(self) -> None:
        del self.student, self.bert


# ------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(one, data: list, warmup: int, device: torch.device) -> dict:
    for i in range(warmup):
        one(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for i in range(warmup, len(data)):
        t0 = time.perf_counter()
        one(i)
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens += int(data[i]["attention_mask"].sum())
    out = {"tokens_per_s": round(tokens / sum(times), 1), "median_step_ms": round(1e3 * statistics.median(times), 2),
           "steps": len(times)}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["_seconds"] = sum(times)
    return out


def model_flops(flops: list[float], result: dict, peak: float | None) -> dict:
    tflops = sum(flops) / result.pop("_seconds") / 1e12
    out = {"model_tflops": round(tflops, 2)}
    if peak:
        out["mfu"] = round(tflops / peak, 4)
    else:
        out["gflops"] = round(1e3 * tflops, 1)
    return out


# ------------------------------------------------------------------------------------------ main
def run_cuda(args) -> list[dict]:
    device = torch.device("cuda")
    steps, warmup = (8, 3) if args.quick else (args.steps, args.warmup)
    settings = [(b, layout) for b in args.batches.split(",") for layout in args.layouts.split(",")]
    data = {(b, layout): random_batches(warmup + steps, *map(int, b.split("x")), packed=layout == "packed", seed=i)
            for i, (b, layout) in enumerate(settings)}
    rows = []
    for impl in args.impls.split(","):
        if impl == "ours":
            runner = Ours(args.shape, device, "bf16", not args.no_compile, args.kernel,
                          {"true": True, "false": False, "auto": None}[args.dynamic],
                          {"auto": None, "on": True, "off": False}[args.teacher_autocast])
            runner.profile = args.profile
        else:
            runner = Reference(args.shape, device, "bf16")
        for (b, layout) in settings:
            for mode in args.mode or ["all", "masked"]:
                try:
                    r = runner.run(mode, data[(b, layout)], warmup)
                except torch.OutOfMemoryError:
                    r = {"error": "out of memory"}
                r = {"impl": impl, "batch": b, "layout": layout, "mode": mode, **r}
                rows.append(r)
                print(json.dumps(r), flush=True)
                gc.collect()
                torch.cuda.empty_cache()
        runner.close()
        del runner
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def run_cpu_child(args) -> dict:
    device = torch.device("cpu")
    data = wiki_batches(args.warmup + args.steps, args.batch)
    mode = args.mode[0]
    cls = Ours if args.impls == "ours" else Reference
    runner = cls(args.shape, device, "bf16" if args.bf16 else "no", False, args.kernel)
    r = runner.run(mode, data, args.warmup)
    return {"impl": args.impls, "shape": args.shape, "mode": mode, "batch": args.batch,
            "mean_tokens_per_step": sum(int(b["attention_mask"].sum()) for b in data[args.warmup:]) / args.steps,
            "threads": torch.get_num_threads(), **r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="cuda: 3 warm-up + 8 timed steps per setting (<= 5 min)")
    p.add_argument("--shape", choices=list(SHAPES), help="cuda: bert-base; cpu: all unless given")
    p.add_argument("--batches", default=",".join(GPU_BATCHES), help="cuda: comma-separated BxL settings")
    p.add_argument("--layouts", default="packed,padded", help="cuda: packed and/or padded")
    p.add_argument("--mode", choices=["all", "masked"], action="append")
    p.add_argument("--impls", default="ours,reference")
    p.add_argument("--kernel", default=None,
                   help="ours: vocabulary-loss kernel (default: triton on cuda, eager on cpu)")
    p.add_argument("--no-compile", action="store_true", help="ours on cuda: eager blocks")
    p.add_argument("--dynamic", choices=["true", "false", "auto"], default="true",
                   help="ours on cuda: compiled blocks with symbolic shapes (true), one graph per shape (false)")
    p.add_argument("--teacher-autocast", choices=["auto", "on", "off"], default="auto",
                   help="ours: the bf16 teacher under autocast (on) or in bf16 end to end (off; auto's choice)")
    p.add_argument("--profile", help="cuda, ours: append torch.profiler tables of two steps per setting here")
    p.add_argument("--batch", type=int, default=8, help="cpu: Wikipedia summaries per batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="cpu: bf16 autocast")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.kernel = args.kernel or ("triton" if args.device == "cuda" else "eager")
    if args.child:
        print(json.dumps(run_cpu_child(args)))
        return
    import transformers

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    header = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
              "kernel": args.kernel, "compile": args.device == "cuda" and not args.no_compile,
              "dynamic": args.dynamic, "teacher_autocast": args.teacher_autocast}
    print(json.dumps(header), flush=True)
    if args.device == "cuda":
        args.shape = args.shape or "bert-base"
        rows = run_cuda(args)
        ours = {(r["batch"], r["layout"], r["mode"]): r for r in rows if r["impl"] == "ours"}
        print(f"\n{name}, bf16, {args.shape}: tokens/s (peak GiB), ours vs reference")
        for r in rows:
            if r["impl"] != "reference" or (r["batch"], r["layout"], r["mode"]) not in ours:
                continue
            o = ours[(r["batch"], r["layout"], r["mode"])]
            if "error" in o or "error" in r:
                print(f"{r['batch']:>8} {r['layout']:6} {r['mode']:6}  ours {o.get('error', '')} "
                      f"ref {r.get('error', '')}")
                continue
            print(f"{r['batch']:>8} {r['layout']:6} {r['mode']:6}  ours {o['tokens_per_s']:>10,.0f} "
                  f"({o['peak_mem_gib']:5.1f})  MFU {100 * o.get('mfu', 0):5.1f}%   ref {r['tokens_per_s']:>10,.0f} "
                  f"({r['peak_mem_gib']:5.1f})   x{o['tokens_per_s'] / r['tokens_per_s']:.2f} speed, "
                  f"x{o['peak_mem_gib'] / r['peak_mem_gib']:.2f} memory")
    else:
        rows = []
        root = Path(__file__).resolve().parents[1]
        for shape in [args.shape] if args.shape else ["tiny", "minilm-3", "bert-base"]:
            for mode in args.mode or ["all", "masked"]:
                for impl in args.impls.split(","):
                    steps = args.steps if shape != "bert-base" else max(3, args.steps // 4)
                    cmd = [sys.executable, __file__, "--child", "--device", "cpu", "--shape", shape, "--mode", mode,
                           "--impls", impl, "--batch", str(args.batch), "--steps", str(steps), "--warmup",
                           str(args.warmup), "--kernel", args.kernel] + (["--bf16"] if args.bf16 else [])
                    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                    if out.returncode:
                        print(f"{shape}/{mode}/{impl}: failed\n{out.stderr[-2000:]}")
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(r)
                    print(f"{r['impl']:9s} {r['shape']:9s} {r['mode']:6s} batch {r['batch']:3d}: "
                          f"{r['tokens_per_s']:9.1f} tokens/s  median step {r['median_step_ms']:8.1f} ms  "
                          f"({r['mean_tokens_per_step']:.0f} tokens/step)  {r['gflops']:6.1f} GFLOP/s  "
                          f"peak RSS {r['peak_rss_mb']:.0f} MB  threads {r['threads']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({**header, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
