"""What --precision bf16-pure (the official code under transformers 5: bf16 weights and AdamW state, no fp32 copy) does
to learning, against fp32 master weights, on the same batches:

    OMP_NUM_THREADS=1 python tests/bench_precision.py [--model DIR] [--data D_SAFE] [--steps 8] [--lr 1e-5]

Prints, per precision, the SFT loss at each step on the safety refusals (batch 4) and the share of weights that the
first AdamW step left exactly as they were (in bf16 an update below half a unit in the last place rounds away)."""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import patcher  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default=os.path.join(os.environ.get("PATCHER_ASSETS", Path.home() / ".cache/patcher-assets"),
                                               "smollm2-135m-instruct"))
p.add_argument("--steps", type=int, default=8)
p.add_argument("--lr", type=float, default=1e-5)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--data", default=str(Path(__file__).parent / "data" / "safety" / "align.jsonl"), help="D_safe records")
args = p.parse_args()

tok = data.load_tokenizer(args.model)
records = data.load_records(args.data, role="safe")
examples = data.tokenize_records(tok, records, 128, data.PAPER_SYSTEM_PROMPT)[0]
for precision in ("fp32", "bf16-pure"):
    flags = patcher.get_parser().parse_args(["--precision", precision])
    torch.manual_seed(0)
    model = patcher.build_model(args.model, torch.device("cpu"), flags)
    opt = patcher.make_optimizer(model.parameters(), args.lr)
    batches = data.BatchIterator(examples, args.batch, seed=0, pad_id=tok.pad_id)
    losses, unchanged = [], None
    for step in range(args.steps):
        before = [q.detach().clone() for q in model.parameters()] if step == 0 else None
        losses.append(patcher.sft_step(model, opt, next(batches))["loss"])
        if before is not None:
            same = sum((q == b).sum().item() for q, b in zip(model.parameters(), before))
            unchanged = same / sum(b.numel() for b in before)
    print(f"{precision:>9}: weights {next(model.parameters()).dtype}, lr {args.lr:g} | loss "
          + " ".join(f"{x:.4f}" for x in losses) + f" | unchanged by the first AdamW step: {100 * unchanged:.1f}% of "
          f"weights", flush=True)
