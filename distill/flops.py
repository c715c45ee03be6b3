"""Model FLOPs of a distillation step, and the accelerator peaks that turn them into MFU.

Counted, per micro-batch, from the two configs and the batch — matrix products only (the convention of
PaLM's MFU and of torch.utils.flop_counter): 2 FLOPs per multiply-add.

    encoder forward    layers x [2 N (4 C^2 + 2 C F)  +  4 C sum_i L_i^2]
                       (Q, K, V, output and the two FFN projections on the N real tokens; Q K^T and A V
                       within each sequence of real length L_i — padding counts nothing)
    teacher            encoder forward; its MLM transform (2 R C^2) and vocabulary projection (2 R C V) on
                       the R scored rows when soft targets or logit MSE need its logits
    student            3 x encoder forward (backward = 2 x forward: input and weight gradients; attention
                       without recomputation); 3 x (2 R C^2 + 2 R C V) for its MLM head on the R scored rows;
                       3 x 2 N C_s C_t per hidden-MSE projection between different widths

MFU = counted FLOPs / time / (peak x processes). The peak comes from `PEAKS` (dense matrix rate of the
precision the step runs in) or the recipe's `train.peak_tflops`; on a CPU, or an accelerator not in the
table, only the achieved rate is reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderShape:
    layers: int
    width: int
    ffn: int
    heads: int


def encoder_forward_flops(shape: EncoderShape, n_tokens: float, sum_sq_len: float) -> float:
    """Forward FLOPs of an encoder on n_tokens real tokens whose sequences' squared lengths sum to sum_sq_len."""
    C, F = shape.width, shape.ffn
    return shape.layers * (2.0 * n_tokens * (4 * C * C + 2 * C * F) + 4.0 * C * sum_sq_len)


def step_flops(*, teacher: EncoderShape, student: EncoderShape, vocab: int, loss_cfg, pairs, projected: list[bool],
               n_tokens: float, sum_sq_len: float, n_rows: float) -> dict[str, float]:
    """Model FLOPs of one micro-batch of the distillation step, by part and in total (module docstring).
    loss_cfg: the recipe's LossConfig; pairs: distill.step.layer_pairs; projected: which hidden-MSE pairs
    have a projection (student width != teacher width)."""
    Ct, Cs, V, R, N = teacher.width, student.width, vocab, n_rows, n_tokens
    vocab_losses = bool(loss_cfg.alpha_ce or loss_cfg.alpha_mlm or loss_cfg.alpha_mse)
    teacher_logits = bool(loss_cfg.alpha_ce or loss_cfg.alpha_mse)
    parts = {
        "teacher_forward": encoder_forward_flops(teacher, N, sum_sq_len),
        "teacher_head": R * (2.0 * Ct * Ct + 2.0 * Ct * V) if teacher_logits else 0.0,
        "student_forward_backward": 3 * encoder_forward_flops(student, N, sum_sq_len),
        "student_head": 3 * R * (2.0 * Cs * Cs + 2.0 * Cs * V) if vocab_losses else 0.0,
        "projections": 3 * 2.0 * N * Cs * Ct * sum(projected) if loss_cfg.alpha_hidden_mse else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


# Dense (no sparsity) matrix-unit peaks in TFLOP/s: (bf16/fp16, tf32, fp32), from the vendors' datasheets
# (SXM parts unless the name says otherwise). First match of the name (case-insensitive) wins, so the more
# specific names come first.
PEAKS: list[tuple[str, tuple[float, float, float]]] = [
    ("gh200", (989.0, 494.7, 66.9)),
    ("h200", (989.0, 494.7, 66.9)),
    ("h100 pcie", (756.0, 378.0, 51.2)),
    ("h100 nvl", (835.0, 417.5, 60.0)),
    ("h100", (989.0, 494.7, 66.9)),
    ("h800", (989.0, 494.7, 66.9)),
    ("b200", (2250.0, 1100.0, 75.0)),
    ("a100", (312.0, 156.0, 19.5)),
    ("a800", (312.0, 156.0, 19.5)),
    ("l40s", (362.1, 183.0, 91.6)),
    ("l40", (181.0, 90.5, 90.5)),
    ("l4", (121.0, 60.0, 30.3)),
    ("a10g", (70.0, 35.0, 31.2)),
    ("a10", (125.0, 62.5, 31.2)),
    ("v100", (125.0, 15.7, 15.7)),  # fp16 tensor cores; no bf16 or tf32 units
    ("t4", (65.0, 8.1, 8.1)),
    ("mi300x", (1307.4, 653.7, 163.4)),
    ("mi250x", (383.0, 95.7, 95.7)),
]


def peak_tflops(device: torch.device, mixed_precision: str, override: float | None = None) -> float | None:
    """The per-device peak for MFU: the recipe's override, else the table's entry for this accelerator and
    precision (bf16/fp16 autocast -> half-precision units; fp32 -> tf32 units when PyTorch lets matmuls
    use them, else plain fp32). None on a CPU or an unknown accelerator."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, (half, tf32, fp32) in PEAKS:
        if key in name:
            if mixed_precision in ("bf16", "fp16"):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    logger.warning("no peak FLOP/s known for %r: MFU is not reported (set train.peak_tflops)", name)
    return None


class ThroughputMeter:
    """Tokens/s, achieved TFLOP/s and MFU over a window of steps (the trainer's logging interval)."""

    def __init__(self, peak: float | None, processes: int):
        self.peak, self.processes = peak, processes
        self.tokens = 0
        self.flops = 0.0
        self.seconds = 0.0

    def add(self, tokens: int, flops: float, seconds: float) -> None:
        self.tokens += tokens
        self.flops += flops
        self.seconds += seconds

    def read(self) -> dict[str, float]:
        """{"tokens_per_s", "tflops" (achieved, all processes), "mfu" (when a peak is known)}; then resets."""
        s = max(self.seconds, 1e-9)
        out = {"tokens_per_s": self.tokens / s, "tflops": self.flops / s / 1e12}
        if self.peak:
            out["mfu"] = out["tflops"] / (self.peak * self.processes)
        self.tokens, self.flops, self.seconds = 0, 0.0, 0.0
        return out
