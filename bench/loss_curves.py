#!/usr/bin/env python3
"""Loss curves side by side for the batch formats (`PACKING = off`, `group`, `on`): the same rows, the same model,
the same learning rate, trained for the same number of rows (two passes over the demo's 175 rows).

    python bench/loss_curves.py            # CPU is enough: a small random Llama 3 with the real Llama 3 tokenizer

Writes bench/results/<date>-loss-curves.png (training loss against rows seen, and eval loss at the end) and a JSON
with every logged loss. A step of `group` or `on` holds several times more rows than a step of `off`, so the curves
are drawn against rows seen, not steps.
"""
from __future__ import annotations
import datetime as dt, json, math, sys, tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def run(mode, base, out, passes=2):
    from taide_ft.config import load_config
    from taide_ft.dataset import build_dataset
    from taide_ft.environment import make_plan
    from taide_ft.model import add_lora, load_model
    import torch
    kw = dict(base_model_name=str(base), dataset_file=str(ROOT/'demo'/'train_data.jsonl'), max_seq_length=512,
              output_dir=str(out/mode), packing=mode, per_device_train_batch_size=4, gradient_accumulation_steps=1,
              learning_rate=5e-4, warmup_steps=1, eval_split=0.1, save_steps=0, logging_steps=1, resume=False, seed=3407,
              max_steps=2)
    cfg = load_config(None, check_files=False, **kw)
    plan = make_plan(cfg)
    model, tok = load_model(cfg, plan)
    data = build_dataset(cfg, tok)
    torch.manual_seed(0)
    model = add_lora(model, cfg, plan)
    from taide_ft.trainer import make_trainer  # after load_model (the backend first)
    probe = make_trainer(cfg, plan, model, tok, data)  # to learn how many steps an epoch of the rows makes in this mode
    steps = math.ceil(passes * probe.steps_data.schedule.steps_per_epoch)
    rows_per_step = passes * len(data.train) / steps
    cfg = load_config(None, check_files=False, **dict(kw, max_steps=steps, warmup_steps=max(1, steps // 20)))
    tr = make_trainer(cfg, plan, model, tok, data)
    tr.train()
    ev = tr.evaluate()['eval_loss']
    losses = [h['loss'] for h in tr.state.log_history if 'loss' in h]
    return dict(mode=mode, steps=steps, rows_per_step=round(rows_per_step, 2), losses=losses, eval_loss=ev,
                rows_seen=[round((i + 1) * rows_per_step, 1) for i in range(len(losses))])


def main():
    from taide_ft.fixtures import tiny_llama
    from taide_ft.environment import setup_logging
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix='taide-curves-'))
    base = tiny_llama(work/'base', hidden_size=256, num_hidden_layers=4)
    res = [run(m, base, work) for m in ('off', 'group', 'on')]
    for r in res: print(f"{r['mode']:>5}: {r['steps']} steps of {r['rows_per_step']} rows, final loss {r['losses'][-1]:.3f}, eval loss {r['eval_loss']:.3f}")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 3.8), dpi=100); ax = fig.subplots()
    for r in res: ax.plot(r['rows_seen'], r['losses'], label=f"PACKING = {r['mode']} ({r['rows_per_step']:.1f} rows a step; eval {r['eval_loss']:.2f})", lw=1.3)
    ax.set_xlabel('rows seen'); ax.set_ylabel('training loss'); ax.grid(alpha=.3); ax.legend()
    ax.set_title('demo data, small random Llama 3, lr 5e-4, two passes')
    stem = HERE/'results'/f"{dt.date.today().isoformat()}-loss-curves"
    fig.savefig(f"{stem}.png", bbox_inches='tight')
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {stem}.png and .json")


if __name__ == '__main__':
    main()
