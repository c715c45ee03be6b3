"""Stand-ins for the paper-scale recipe where the hub cannot be reached (the GPU machines of our CI-less
benchmarks): a randomly initialised BERT teacher of a given size, saved with a tokenizer, and a local text
corpus of random vocabulary words — same shapes and token counts as the real thing, so the recipe's step,
data pipeline and throughput run as they would on bert-base-uncased and Wikipedia.

    python benchmarks/paper_scale_setup.py --tokenizer DIR --out /tmp/paper [--size bert-base] [--tokens 4e6]
    accelerate launch distill/run.py recipes/bert-base-wikipedia.yaml teacher.name_or_path=/tmp/paper/teacher \\
        tokenizer=/tmp/paper/teacher data.source=files data.files=[/tmp/paper/corpus.txt] tracking.wandb=false ...
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
         "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory (bert-base-uncased vocabulary)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=list(SIZES), default="bert-base")
    p.add_argument("--tokens", type=float, default=4e6, help="approximate corpus size in words")
    args = p.parse_args()
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from students.tokenizer import get_tokenizer

    out = Path(args.out)
    tokenizer = get_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), **SIZES[args.size]))
    teacher.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and not w.startswith("[")]
    rng = random.Random(0)
    written = 0
    with open(out / "corpus.txt", "w") as f:
        while written < args.tokens:
            n = rng.randint(100, 1200)
            f.write(" ".join(rng.choices(words, k=n)) + "\n")
            written += n
    print(f"teacher {out / 'teacher'} ({args.size}), corpus {out / 'corpus.txt'} ({written:,} words)")


if __name__ == "__main__":
    main()
