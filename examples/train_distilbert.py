"""Train a DistilBERT topic classifier with the flat API, offline (Wikipedia summaries, 11 topics).

    python examples/train_distilbert.py                                  # random init, small preset
    python examples/train_distilbert.py --model runs/wiki/student        # start from a distilled student

Prints validation metrics per epoch and the test accuracy, macro-F1 and confusion matrix.
"""

import argparse

import torch

from distilbert_kit import (
    AMPTrainer,
    DistilBERTForSequenceClassification,
    create_classification_dataloader,
    create_model_config,
    evaluate_classification_metrics,
    get_tokenizer,
)
from distill.downstream.tasks import load_classification
from distill.recipes import TaskConfig

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="a DistilBERT checkpoint directory to start from (default: random init)")
parser.add_argument("--preset", default="minilm-l3-h384 (student)", help="config preset for random init")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--max-length", type=int, default=128)
parser.add_argument("--max-train", type=int, default=2000, help="training examples used (0: all)")
parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
args = parser.parse_args()
torch.manual_seed(0)

data = load_classification(TaskConfig(source="wiki-topics"))
names = data.label_names
train, val, test = data.splits["train"], data.splits["validation"], data.splits["test"]
if args.max_train:
    train = train.select(range(min(args.max_train, len(train))))

tokenizer = get_tokenizer(args.model or "distilbert-base-uncased")
if args.model:
    model = DistilBERTForSequenceClassification.from_pretrained(args.model, num_labels=len(names))
else:
    model = DistilBERTForSequenceClassification(create_model_config(args.preset, num_labels=len(names)))

train_dl = create_classification_dataloader(train["text"], train["label"], tokenizer, args.batch_size, args.max_length)
val_dl = create_classification_dataloader(val["text"], val["label"], tokenizer, 64, args.max_length, shuffle=False)
test_dl = create_classification_dataloader(test["text"], test["label"], tokenizer, 64, args.max_length, shuffle=False)

optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
device = "cuda" if torch.cuda.is_available() else "cpu"
trainer = AMPTrainer(model, optimizer, precision=args.precision, device=device)
for epoch in range(args.epochs):
    loss = trainer.train_epoch(train_dl)
    m = trainer.evaluate(val_dl)
    print(f"epoch {epoch + 1}: train loss {loss:.4f}  validation accuracy {m['accuracy']:.4f}  "
          f"macro-F1 {m['macro_f1']:.4f}")

m = evaluate_classification_metrics(model, test_dl, len(names))
print(f"test accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}")
print("confusion matrix (rows: true, columns: predicted):")
for name, row in zip(names, m["confusion_matrix"]):
    print(f"  {name[:24]:24s} {' '.join(f'{v:4d}' for v in row)}")
