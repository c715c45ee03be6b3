"""Checks of the CUDA-only paths of the step, on a GPU (the CPU test suite cannot run them):

1. variable-length flash attention on token rows vs the padded SDPA path (forward and gradients, bf16);
2. the Triton vocabulary-loss kernel vs the eager PyTorch one (losses and gradients, bf16, BERT's vocabulary);
3. the whole step with compiled blocks + Triton vs eager blocks + eager losses (same weights and batch);
4. the analytic FLOP count vs torch.utils.flop_counter.FlopCounterMode over one real step (bert-base, packed and
   padded; the counter sees the variable-length flash kernels with their real lengths).

    python benchmarks/gpu_checks.py [--json out.json]

Prints one line per check with the measured differences and PASS/FAIL; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_step import Ours, random_batches  # noqa: E402

from distill.losses import VocabLossWeights, fused_vocab_losses  # noqa: E402
from students.modeling import TokenLayout, attend_rows  # noqa: E402

results = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def report(name: str, ok: bool, **numbers) -> None:
    r = {"check": name, "ok": bool(ok), **{k: (round(v, 7) if isinstance(v, float) else v) for k, v in numbers.items()}}
    results.append(r)
    print(json.dumps(r), flush=True)


def check_flash_varlen() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 513, (8,), generator=g)
    lengths[0] = 512
    mask = (torch.arange(512)[None] < lengths[:, None]).long()
    layout = TokenLayout.from_mask(mask).to("cuda")
    N, nh, hs = layout.n_tokens, 12, 64
    qkv = [torch.randn(N, nh, hs, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    grad = torch.randn(N, nh, hs, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for flash in (True, False):
        for x in qkv:
            x.grad = None
        y = attend_rows(*qkv, dataclasses.replace(layout, flash=flash))
        y.backward(grad)
        outs[flash] = (y.detach(), [x.grad.clone() for x in qkv])
    fwd = rel(outs[True][0], outs[False][0])
    bwd = max(rel(a, b) for a, b in zip(outs[True][1], outs[False][1]))
    y = attend_rows(*qkv, layout, dropout_p=0.1)  # dropout through the varlen kernel: runs, differs
    y.backward(grad)
    report("flash_varlen_vs_padded_sdpa", fwd < 1e-2 and bwd < 2e-2, forward_rel=fwd, grad_rel=bwd,
           dropout_differs=rel(y.detach(), outs[True][0]) > 1e-2)


def check_triton_kernel() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    n, C, V = 6000, 768, 30522
    h = (torch.randn(n, C, device="cuda", generator=g) * 0.5).requires_grad_()
    W = (torch.randn(V, C, device="cuda", generator=g) * 0.05).requires_grad_()
    b = torch.zeros(V, device="cuda", requires_grad=True)
    h_t, W_t = torch.randn(n, C, device="cuda", generator=g) * 0.5, torch.randn(V, C, device="cuda", generator=g) * 0.05
    b_t = torch.zeros(V, device="cuda")
    labels = torch.where(torch.rand(n, device="cuda", generator=g) < 0.15,
                         torch.randint(0, V, (n,), device="cuda", generator=g), torch.full((n,), -100, device="cuda"))
    out = {}
    for kernel in ("eager", "triton"):
        for x in (h, W, b):
            x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            vals = fused_vocab_losses(h, W, b, h_t.bfloat16(), W_t.bfloat16(), b_t.bfloat16(), labels,
                                      VocabLossWeights(5.0, 2.0, 0.0, 2.0, kernel),
                                      torch.tensor(float(n), device="cuda"), (labels != -100).sum().float())
        vals[0].backward()
        out[kernel] = ([v.detach() for v in vals], [x.grad.clone() for x in (h, W, b)])
    loss = max(rel(a, b) for a, b in zip(out["triton"][0][:3], out["eager"][0][:3]))
    grads = max(rel(a, b) for a, b in zip(out["triton"][1], out["eager"][1]))
    report("triton_vs_eager_vocab_loss", loss < 1e-4 and grads < 2e-2, loss_rel=loss, grad_rel=grads)


def check_compiled_step() -> None:
    """Same weights, same batches, dropout off: compiled blocks + Triton vs eager blocks + eager losses."""
    losses = {}
    for compile, kernel in ((False, "eager"), (True, "triton")):
        ours = Ours("minilm-3", torch.device("cuda"), "bf16", compile, kernel)
        for m in ours.student.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        step = ours.step_for("all")
        data = random_batches(3, 16, 128, packed=False, seed=1)
        losses[compile] = [step([step.prepare(b)]).losses["total"] for b in data]
        ours.close()
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False]))
    report("compiled_triton_step_vs_eager_step", diff < 2e-2, max_rel_loss_diff=diff, compiled=losses[True],
           eager=losses[False])


def check_flop_count() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    ours = Ours("bert-base", torch.device("cuda"), "bf16", False, "triton")
    for layout in ("packed", "padded"):
        step = ours.step_for("all")
        batch = random_batches(1, 16, 256, packed=layout == "packed", seed=3)[0]
        step([step.prepare(batch)])  # warm-up
        prepared = step.prepare(batch)
        analytic = prepared.norms[3].item()
        with FlopCounterMode(display=False) as counter:
            step([prepared])
        counted = counter.get_total_flops()
        # FlopCounterMode counts flash attention's backward as 2.5x its forward (it recomputes the scores);
        # model FLOPs count 2x. Only attention differs, so the ratio sits a little under 1.
        report(f"flop_count_{layout}", 0.9 < analytic / counted <= 1.0, analytic=analytic, counted=counted,
               ratio=analytic / counted)
    ours.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    args = p.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    for check in (check_flash_varlen, check_triton_kernel, check_compiled_step, check_flop_count):
        try:
            check()
        except Exception as e:  # report and go on: one device call runs every check
            report(check.__name__, False, error=f"{type(e).__name__}: {str(e)[:500]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
