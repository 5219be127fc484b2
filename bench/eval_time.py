#!/usr/bin/env python3
"""How long the evaluation's answers take at the shipped config: the 8B-shaped model as `taide-ft run` loads it
(Unsloth 4-bit on a GPU), LoRA on, and `taide_ft.evaluate.generate` answering the eval rows twice (adapter off,
then on). A random-weight model never stops by itself, so every answer runs to the cap: an upper bound.

    python bench/eval_time.py --model-dir /dev/shm/llama8b --rows 100 --cap 512
"""
import argparse, json, random, sys, time
from pathlib import Path

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model-dir', default='/dev/shm/llama8b'); ap.add_argument('--rows', type=int, default=100)
    ap.add_argument('--cap', type=int, default=512); ap.add_argument('--out', default='')
    a = ap.parse_args()
    from taide_ft.config import load_config
    from taide_ft.environment import make_plan
    from taide_ft.model import add_lora, load_model
    cfg = load_config(Path(__file__).resolve().parents[1]/'config.ini', check_files=False, base_model_name=a.model_dir)
    plan = make_plan(cfg)
    model, tok = load_model(cfg, plan)
    model = add_lora(model, cfg, plan)
    from taide_ft.evaluate import generate
    rng = random.Random(0)
    words = ['台灣', '最高', '的山', '是哪', '一座', '請問', '公司', '特休', '幾天', '規定', '資料', '根據', '回答', '問題']
    prompts = [[{'role': 'system', 'content': cfg.data.system_prompt},
                {'role': 'user', 'content': ''.join(rng.choice(words) for _ in range(max(8, int(rng.lognormvariate(4.5, 0.8)))))}]
               for _ in range(a.rows)]
    res = {}
    for name in ('before', 'after'):
        t = time.time()
        if name == 'before':
            with model.disable_adapter(): ans = generate(model, tok, prompts, a.cap, 32, plan.backend == "unsloth")
        else: ans = generate(model, tok, prompts, a.cap, 32, plan.backend == "unsloth")
        res[name] = dict(seconds=round(time.time() - t, 1), tokens=sum(ans.tokens), stopped=sum(ans.stopped))
        print(name, res[name], flush=True)
    out = dict(rows=a.rows, cap=a.cap, backend=plan.backend, prompt_tokens_mean=sum(len(tok.apply_chat_template(p, tokenize=False)) for p in prompts) / a.rows, **res)
    print(json.dumps(out))
    if a.out: Path(a.out).write_text(json.dumps(out, indent=1))

if __name__ == '__main__': sys.exit(main())
