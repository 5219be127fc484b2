#!/usr/bin/env python3
"""One optimizer step on the same rows under each way of cutting it into micro-batches, on this machine's backend:
the loss and the LoRA gradients must agree (a step's loss is the mean over its answer tokens however it is cut),
and the report says which attention path Unsloth took for padding-free micro-batches.

    python bench/layouts.py                 # a small random Llama-3 shape; on a CUDA GPU with Unsloth, or the CPU
    python bench/layouts.py --hidden 4096 --layers 32 --heads 32 --kv 8   # the 8B shape

Layouts: `auto` (the default: the step's rows sorted into as few micro-batches as fit; padding-free where the plan
says), `auto-padded` (the same, padded), `off` (PER_DEVICE_TRAIN_BATCH_SIZE rows a micro-batch, in the drawn order).
"""
from __future__ import annotations
import argparse, dataclasses, json, math, os, sys, tempfile, time
from pathlib import Path


def build(dest, hidden, layers, heads, kv, seed=0):
    "A random Llama 3 model (bf16 on a GPU) with the PyPI Llama 3 tokenizer, saved to `dest`."
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from taide_ft.fixtures import llama3_tokenizer
    tok = llama3_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, intermediate_size=int(3.5 * hidden),
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=131072, rope_theta=500000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, torch_dtype='bfloat16')
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(dest); tok.save_pretrained(dest)
    return Path(dest)


def rows(n, seed=1, hi=1024):
    "Rows of mixed lengths (log-normal, median 200) with labels on the last 80 %."
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = max(16, min(hi, int(rng.lognormvariate(math.log(200), 0.8))))
        ids = [rng.randrange(1000, 120000) for _ in range(L)]
        p = L // 5
        out.append({'input_ids': ids, 'labels': [-100] * p + ids[p:], 'length': L})
    return out


def one_step(model_dir, layout, data, seq):
    import torch
    from datasets import Dataset
    from taide_ft.config import load_config
    from taide_ft.environment import make_plan
    from taide_ft.model import add_lora, load_model
    packing = 'off' if layout == 'off' else 'auto'
    cfg = load_config(None, check_files=False, base_model_name=str(model_dir), packing=packing, max_seq_length=seq,
                      per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=2, warmup_steps=0, save_steps=0,
                      output_dir=tempfile.mkdtemp(), eval=False)
    plan = make_plan(cfg)
    if layout == 'auto-padded': plan = dataclasses.replace(plan, padding_free=False)
    model, tok = load_model(cfg, plan)
    model = add_lora(model, cfg, plan)
    g = torch.Generator().manual_seed(1)  # LoRA B starts at zero: give it values, so that A's gradient is not zero
    for n, p in model.named_parameters():
        if 'lora_B' in n: p.data.copy_(torch.randn(p.shape, generator=g).mul_(0.02).to(p.dtype))
    from taide_ft.trainer import make_trainer
    tr = make_trainer(cfg, plan, model, tok, Dataset.from_list(data))
    item = tr.steps_data[0]
    tr.create_optimizer_and_scheduler(num_training_steps=2)
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    loss = tr.training_step(tr.model_wrapped if hasattr(tr, 'model_wrapped') else model, item)
    if torch.cuda.is_available(): torch.cuda.synchronize()
    secs = time.perf_counter() - t
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    out = dict(layout=layout, backend=plan.backend, padding_free=plan.padding_free and plan.batches == 'sorted', loss=float(loss),
               micro_batches=len(item['micro_batches']), rows=item['step_rows'], grad_norm=math.sqrt(sum(float(x.pow(2).sum()) for x in grads.values())),
               seconds_first_step=round(secs, 2))
    del tr, model
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    return out, grads


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--hidden', type=int, default=1024); ap.add_argument('--layers', type=int, default=4)
    ap.add_argument('--heads', type=int, default=16); ap.add_argument('--kv', type=int, default=4)
    ap.add_argument('--seq', type=int, default=1024); ap.add_argument('--out', default='')
    a = ap.parse_args()
    import torch
    d = Path(tempfile.mkdtemp(dir='/dev/shm' if Path('/dev/shm').is_dir() else None))/'model'
    build(d, a.hidden, a.layers, a.heads, a.kv)
    data = rows(24, hi=a.seq)
    res, grads = [], {}
    for layout in ('auto', 'auto-padded', 'off'):
        r, g = one_step(d, layout, data, a.seq); res.append(r); grads[layout] = g
        print(json.dumps(r), flush=True)
    ref = grads['off']
    for r in res:
        r['loss_rel_diff'] = abs(r['loss'] - res[-1]['loss']) / abs(res[-1]['loss'])
        r['grad_max_rel_diff'] = max(((grads[r['layout']][n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item() for n in ref)
    varlen = None
    if 'unsloth' in sys.modules:
        import unsloth.utils.attention_dispatch as ad
        varlen = dict(torch_varlen=getattr(ad, '_TORCH_VARLEN_ATTN', None) is not None, lean=bool(getattr(ad, '_LEAN_VARLEN', False)))
    report = dict(layouts=res, unsloth_varlen=varlen, torch=torch.__version__, device=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
    print(json.dumps(report, indent=1))
    if a.out: Path(a.out).write_text(json.dumps(report, indent=1))
    tol = 2e-2 if torch.cuda.is_available() else 1e-4  # bf16 on a GPU, float32 on the CPU
    bad = [r['layout'] for r in res if r['loss_rel_diff'] > tol or r['grad_max_rel_diff'] > 10 * tol]
    print('LAYOUTS AGREE' if not bad else f"LAYOUTS DIFFER: {bad}")
    return 1 if bad else 0


if __name__ == '__main__': sys.exit(main())
