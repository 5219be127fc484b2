#!/usr/bin/env python3
"""Training-speed benchmark: taide_ft's default path against the Unsloth notebook recipe and plain
transformers + PEFT + TRL, on a Llama-3.1-8B-shaped model with random weights.

One run measures every setup x workload in a fresh subprocess per setup (Unsloth patches transformers
globally, and a new process frees all GPU memory), and writes one JSON file of figures.

    python bench/bench.py                      # the default setups on full,mix4k (needs a CUDA GPU)
    python bench/bench.py --dry-run            # build the workloads, print their statistics and the a* setups' plans
    python bench/bench.py --help

See bench/README.md for what each setup is and how tokens are counted.
"""
from __future__ import annotations

import argparse, contextlib, dataclasses, datetime as dt, gc, importlib.metadata as md, json, math, os, re
import shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# ----------------------------------------------------------------------------------------------
# What is measured

SETUPS = {
    'a': "taide_ft's default path (config.ini, PACKING = auto) via make_plan / load_model / add_lora / make_trainer: "
         "steps of 2 x 4 = 8 rows cut into as few micro-batches as fit (sorted), padding-free where the plan says",
    'a-padded': "as a, with padded micro-batches (the plan's padding_free set to False)",
    'a-off': "taide_ft with PACKING = off: 4 micro-batches of 2 rows a step, padded (the literal 2 x 4)",
    'a-group': "taide_ft with PACKING = group (the previous default): rows of similar length in 4 padded micro-batches "
               "of up to 2 x MAX_SEQ_LENGTH tokens a step",
    'a-pack': "taide_ft with PACKING = on: rows packed end to end into MAX_SEQ_LENGTH bins, 2 bins a micro-batch, 4 a step",
    'a-lean': "as a, with GRADIENT_CHECKPOINTING = offload (the low-memory mode)",
    'a-bf16': "as a, with BASE_PRECISION = bf16: 16-bit base weights (LoRA, not QLoRA)",
    'a-fp8': "as a, with BASE_PRECISION = fp8: FP8 base weights with per-channel scales (Unsloth's load_in_fp8, torchao)",
    'b': "Unsloth Llama 3.1 notebook recipe: FastLanguageModel 4-bit + TRL SFTTrainer",
    'c': "transformers + PEFT + TRL SFTTrainer, bitsandbytes nf4 (double quant, bf16 compute)",
    'c16': "transformers + PEFT + TRL SFTTrainer, bf16 weights (no quantization; not run by default)",
}
ALIASES = {'a-pad': 'a-off'}  # the name a-off had before

BATCH, ACCUM = 2, 4  # config.ini's PER_DEVICE_TRAIN_BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS; b and c use the same
JOB_STEPS = 60  # config.ini's MAX_STEPS: the seed's whole job is 60 steps of 8 rows, 480 rows
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0, bias='none',
            target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'])
SEED = 3407

# Workloads. seq: MAX_SEQ_LENGTH (max_length) of every setup on the workload. full: every row seq tokens. mix*: log-normal
# lengths of the given median and mean before clipping (mu = ln median, sigma = sqrt(2 ln(mean / median))), rounded and
# clipped to [MIX_MIN, seq]; `factor` x the rows the measured steps of 8 rows use, so that setups whose steps hold more
# rows (group, on) do not run out.
WORKLOADS = {
    'full': dict(seq=2048),
    'mix': dict(seq=2048, median=350, mean=429, factor=6),
    'mix4k': dict(seq=4096, median=320, mean=457, factor=12),  # config.ini's MAX_SEQ_LENGTH 4096, instruction-data lengths
}
MIX_MIN = 32
MAX_LENGTH = 0       # --max-length: caps every workload's seq (quick checks only); 0: no cap
PROMPT_SHARE = 0.2   # labels are -100 on the first floor(0.2 * length) tokens of every row
TOKEN_HI = 128000    # token ids are drawn uniformly from [0, 128000): Llama 3's special ids start at 128000


def seq_of(workload) -> int:
    "MAX_SEQ_LENGTH of every setup on `workload` (capped by --max-length)."
    s = WORKLOADS[workload]['seq']
    return min(s, MAX_LENGTH) if MAX_LENGTH else s


def lognormal(workload) -> tuple:
    "(mu, sigma) of a mix workload's log-normal lengths."
    w = WORKLOADS[workload]
    return math.log(w['median']), math.sqrt(2 * math.log(w['mean'] / w['median']))


LLAMA31_8B = dict(  # Llama-3.1-8B's config.json (weights are random here)
    architectures=['LlamaForCausalLM'], model_type='llama', hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling={'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                  'original_max_position_embeddings': 8192, 'rope_type': 'llama3'},
    rms_norm_eps=1e-5, hidden_act='silu', attention_bias=False, mlp_bias=False, initializer_range=0.02,
    bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004,
    tie_word_embeddings=False, torch_dtype='bfloat16', use_cache=True)
TINY = dict(LLAMA31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)

OFFLINE_ENV = dict(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1',
                   UNSLOTH_DISABLE_STATISTICS='1', TOKENIZERS_PARALLELISM='false', PYTHONUNBUFFERED='1')


def n_params(c: dict) -> int:
    "Parameter count of a Llama config (8,030,261,248 for Llama-3.1-8B)."
    h, i, L, v = c['hidden_size'], c['intermediate_size'], c['num_hidden_layers'], c['vocab_size']
    kv = h // c['num_attention_heads'] * c['num_key_value_heads']
    layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return L * layer + v * h * (1 if c['tie_word_embeddings'] else 2) + h


# ----------------------------------------------------------------------------------------------
# Workloads: the same rows (same seed) for every setup

def rows_needed(workload, max_steps):
    "Rows in the data set: the run's steps of 8 rows, plus room for setups whose steps hold more rows."
    per_step = BATCH * ACCUM
    return per_step * max_steps + per_step if workload == 'full' else per_step * max_steps * WORKLOADS[workload]['factor']


def make_rows(workload, n, seed=SEED):
    "(input_ids, labels) lists: random ids below 128000, labels -100 on a 20 % prompt prefix."
    import numpy as np
    rng, seq = np.random.default_rng(seed), seq_of(workload)
    if workload == 'full': lengths = np.full(n, seq)
    else: lengths = np.clip(np.rint(rng.lognormal(*lognormal(workload), n)), MIX_MIN, seq).astype(int)
    ids, labels = [], []
    for L in lengths:
        x = rng.integers(0, TOKEN_HI, int(L)).tolist()
        p = int(PROMPT_SHARE * L)
        ids.append(x); labels.append([-100] * p + x[p:])
    return ids, labels


def row_stats(ids, labels):
    import numpy as np
    L = np.array([len(x) for x in ids])
    return dict(rows=int(len(L)), tokens=int(L.sum()), mean=round(float(L.mean()), 1), median=float(np.median(L)),
                p10=round(float(np.percentile(L, 10)), 1), p90=round(float(np.percentile(L, 90)), 1), min=int(L.min()), max=int(L.max()),
                loss_tokens=int(sum(sum(1 for t in y if t != -100) for y in labels)),
                expected_tokens_per_step=round(float(L.mean()) * BATCH * ACCUM, 1))


def workload_spec(workload, max_steps):
    spec = dict(rows=rows_needed(workload, max_steps), seed=SEED, max_seq_length=seq_of(workload), token_ids=f"uniform in [0, {TOKEN_HI})",
                labels=f"input_ids, with -100 on the first floor({PROMPT_SHARE} * length) tokens")
    if workload == 'full': spec['lengths'] = f"all {seq_of(workload)}"
    else:
        (mu, sigma), w = lognormal(workload), WORKLOADS[workload]
        spec['lengths'] = dict(dist='lognormal', mu=round(mu, 4), sigma=round(sigma, 4), median=w['median'],
                               mean_before_clip=w['mean'], clip=[MIX_MIN, seq_of(workload)], rounding='nearest integer')
    return spec


def make_dataset(workload, max_steps):
    from datasets import Dataset
    ids, labels = make_rows(workload, rows_needed(workload, max_steps))
    return Dataset.from_dict({'input_ids': ids, 'labels': labels, 'length': [len(x) for x in ids]})


# ----------------------------------------------------------------------------------------------
# Measurement inside a worker

class Meter:
    """Counts what the model is actually fed (a forward pre-hook on the trained model) and times
    optimizer steps (a TrainerCallback). Real tokens are ids below 128000: the rows hold no others,
    and every pad id (Llama 3's are >= 128000) is left out, whatever the collator pads with.
    With taide_ft's trainer, its monitor's counts (rows and tokens of each step, micro-batches) are read at the same marks."""

    def __init__(self, trainer, warmup, steps):
        import torch
        from transformers import TrainerCallback
        self.torch, self.warmup, self.steps = torch, warmup, steps
        dev = trainer.model.device if hasattr(trainer.model, 'device') else 'cpu'
        self.real = torch.zeros((), dtype=torch.int64, device=dev)   # summed on the GPU: no sync per micro-step
        self.fed = torch.zeros((), dtype=torch.int64, device=dev)
        self.rows = torch.zeros((), dtype=torch.int64, device=dev)
        self.emb = torch.zeros((), dtype=torch.int64, device=dev)  # the same count at the input embedding
        self.formats, self.marks, self.collated = set(), [], [0, 0]
        self.recompute = None
        self.monitor = getattr(trainer, 'monitor', None)  # taide_ft's TrainMonitor: the rows of each step, exactly
        self.handles = [trainer.model.register_forward_pre_hook(self._hook, with_kwargs=True)]
        # A second count at the input embedding: a cross-check, and the count to use should a trainer
        # call an inner module rather than the model it was given.
        try: emb = trainer.model.get_input_embeddings()
        except Exception: emb = None
        if emb is not None: self.handles.append(emb.register_forward_pre_hook(self._emb_hook, with_kwargs=True))
        meter = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                meter._mark(0)
            def on_step_end(self, args, state, control, model=None, **kw):
                meter._mark(state.global_step)
                if meter.recompute is None: meter.recompute = _recomputes(trainer.model)
        trainer.add_callback(_CB())
        if self.monitor is not None: return  # taide_ft's collator is its StepData; the monitor counts instead
        # Fallback count, as rows reach the collator (the loader runs a batch ahead, so this is the whole
        # run's count, not the measured steps'). TRL's collators are patched in place, not replaced: Unsloth
        # has already wrapped their `torch_call` and may look at the collator's attributes later.
        coll = trainer.data_collator
        def count(examples):
            self.collated[0] += len(examples)
            self.collated[1] += sum(len(e['input_ids']) for e in examples if isinstance(e, dict) and 'input_ids' in e)
        if hasattr(coll, 'torch_call'):
            inner = coll.torch_call
            def torch_call(examples): count(examples); return inner(examples)
            coll.torch_call = torch_call
        elif callable(coll):
            def counting_collator(examples): count(examples); return coll(examples)
            trainer.data_collator = counting_collator

    def _hook(self, module, args, kwargs):
        if not module.training: return
        ids = kwargs.get('input_ids', args[0] if args else None)
        if ids is None: return
        real = ids < TOKEN_HI
        self.real += real.sum(); self.fed += ids.numel()
        pos, am = kwargs.get('position_ids'), kwargs.get('attention_mask')
        if kwargs.get('packed_seq_lengths') is not None:
            self.rows += len(kwargs['packed_seq_lengths']); fmt = 'padding-free (packed_seq_lengths)'
        elif pos is not None and am is None and ids.shape[0] == 1:
            self.rows += ((pos == 0) & real).sum(); fmt = 'padding-free (position_ids)'
        else:
            self.rows += ids.shape[0]; fmt = 'padded' if am is not None else 'no mask'
        self.formats.add(f"{fmt}, {ids.shape[0]} x seq")

    def _emb_hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get('input')
        if module.training and ids is not None and not ids.is_floating_point(): self.emb += (ids < TOKEN_HI).sum()

    def _mark(self, step):
        torch = self.torch
        if torch.cuda.is_available(): torch.cuda.synchronize()
        counts = torch.stack([self.real, self.fed, self.rows, self.emb])
        import torch.distributed as td
        if td.is_available() and td.is_initialized():  # several processes: every one marks each step; sum them
            td.all_reduce(counts)
            if torch.cuda.is_available(): torch.cuda.synchronize()
        m = self.monitor  # its rows and tokens are every process's already (micro-batches: this process's)
        self.marks.append((step, time.perf_counter(), *map(int, counts.tolist()),
                           *((m.rows, m.tokens, m.micro_batches) if m is not None else (0, 0, 0))))

    def result(self):
        for h in self.handles: h.remove()
        by_step = {m[0]: m for m in self.marks}
        W, S = self.warmup, self.steps
        if W not in by_step or W + S not in by_step:
            return dict(error=f"steps seen: {sorted(by_step)}; need {W} and {W + S}")
        a, b = by_step[W], by_step[W + S]
        secs, real, fed, rows, emb, m_rows, m_tokens, m_micro = (b[k] - a[k] for k in range(1, 9))
        source = 'forward pre-hook on the trained model, measured steps only'
        if real == 0 and emb > 0:
            real, source = emb, 'forward pre-hook on the input embedding, measured steps only'
        # rows a step: the monitor's where there is one (the hook also counts the one-token companion rows of padded batches)
        step_rows = m_rows if self.monitor is not None else rows
        step_times = [round(by_step[k][1] - by_step[k - 1][1], 3) for k in range(1, W + S + 1) if k in by_step and k - 1 in by_step]
        out = dict(measured_steps=S, seconds=round(secs, 3), seconds_per_step=round(secs / S, 3),
                   tokens_per_s=round(real / secs, 1), real_tokens=real, fed_tokens=fed,
                   padding_share=round(1 - real / fed, 4) if fed else None,
                   rows=step_rows, rows_per_step=round(step_rows / S, 2), real_tokens_per_step=round(real / S, 1),
                   # the seed's job (JOB_STEPS steps of BATCH x ACCUM rows) at the measured steady-state pace:
                   job_seconds=round(JOB_STEPS * secs / S, 1),  # JOB_STEPS steps as this setup makes them
                   job_rows_seconds=round(JOB_STEPS * BATCH * ACCUM * secs / step_rows, 1) if step_rows else None,  # its rows
                   step_seconds=step_times, batch_format=sorted(self.formats), recompute=self.recompute,
                   hook_rows=rows, embedding_real_tokens=emb, count_source=source)
        if self.monitor is not None:
            out.update(monitor_tokens=m_tokens, micro_batches_per_step=round(m_micro / S, 2))
        else: out.update(collator_rows_whole_run=self.collated[0], collator_tokens_whole_run=self.collated[1])
        if real == 0: out['error'] = 'no training forward was seen'
        return out


def _recomputes(model):
    "Whether activations are recomputed in backward (HF or Unsloth gradient checkpointing)."
    for m in model.modules():
        if getattr(m, 'gradient_checkpointing', False) is True or getattr(m, '_offloaded_gradient_checkpointing', False):
            return True
    return bool(getattr(model, 'is_gradient_checkpointing', False))


# ----------------------------------------------------------------------------------------------
# Setups (each runs in its own worker process)

def _sft_config(out_dir, max_steps, cuda, seq, **extra):
    from trl import SFTConfig
    kw = dict(output_dir=str(out_dir), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
              warmup_steps=min(5, max_steps - 1), max_steps=max_steps, learning_rate=2e-4, logging_steps=1,
              optim='adamw_8bit' if cuda else 'adamw_torch', weight_decay=0.01, lr_scheduler_type='linear', seed=SEED,
              report_to='none', bf16=cuda, max_length=seq, packing=False, save_strategy='no', dataloader_num_workers=0)
    if not cuda: kw['use_cpu'] = True
    kw.update(extra)
    return SFTConfig(**kw)


def a_config(a, overrides, seq, out_dir):
    "config.ini with the benchmark's overrides (model folder, MAX_SEQ_LENGTH, steps, no checkpoints) and a variant's."
    from taide_ft.config import load_config
    steps = a.warmup + a.steps
    return load_config(ROOT/'config.ini', check_files=False, base_model_name=str(a.model_dir), max_seq_length=seq,
                       max_steps=steps, warmup_steps=min(5, steps - 1), output_dir=str(out_dir), save_steps=0,
                       resume=False, logging_steps=1, seed=SEED, **overrides)


def plan_info(plan) -> dict:
    "A plan's fields (all but the base model and the machine) and its summary, for the JSON."
    out = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name not in ('base', 'machine')}
    return dict(out, summary=repr(plan))


class SetupA:
    "taide_ft's default path: config.ini with the benchmark's overrides, through make_plan, load_model, add_lora and make_trainer."
    overrides = {}  # config keys a variant sets on top of config.ini; none for (a) itself

    def __init__(self, a): self.a = a

    def adjust(self, plan): return plan  # a variant may change the plan

    def plan(self, seq, out_dir):
        "(cfg, plan) for rows of up to `seq` tokens, on the machine as it was before the model loaded."
        from taide_ft.environment import make_plan
        cfg = a_config(self.a, self.overrides, seq, out_dir)
        return cfg, self.adjust(make_plan(cfg, self.machine, self.base))

    def load(self):
        from taide_ft.environment import probe_machine, resolve_base
        from taide_ft.model import add_lora, load_model
        self.machine, self.base = probe_machine(), resolve_base(str(self.a.model_dir))  # free GPU memory before loading
        seq = max(seq_of(wl) for wl in self.a.workloads)  # the model serves every workload: loaded for the longest rows
        cfg, self.loaded = self.plan(seq, self.a.out_root/f'{self.a.setup}-load')
        model, tok = load_model(cfg, self.loaded)
        model = add_lora(model, cfg, self.loaded)
        return model, tok, dict(max_seq_length=seq, plan=plan_info(self.loaded), config=dict(
            gradient_checkpointing=cfg.train.gradient_checkpointing, packing=cfg.train.packing, target_modules=cfg.lora.target_modules,
            r=cfg.lora.r, load_in_4bit=cfg.quant.load_in_4bit, base_precision=cfg.quant.base, backend=cfg.hardware.backend))

    def trainer(self, model, tok, ds, workload):
        cfg, plan = self.plan(seq_of(workload), self.a.out_root/f'{self.a.setup}-{workload}')
        from taide_ft.trainer import make_trainer  # after load_model: Unsloth has patched TRL
        tr = make_trainer(cfg, plan, model, tok, ds)
        sched = tr.steps_data.schedule
        self.last = dict(trainer=type(tr).__name__, plan=plan_info(plan), steps_per_epoch=sched.steps_per_epoch,
                         collator=type(tr.steps_data.collate).__name__, optim=str(tr.args.optim), coverage=tr.coverage)
        if plan.backend == 'unsloth' and plan.checkpointing != self.loaded.checkpointing:  # Unsloth's is set with LoRA, for the longest workload
            self.last['checkpointing_note'] = (f"this workload's plan says checkpointing {plan.checkpointing}; the model was set up "
                                               f"with {self.loaded.checkpointing} (the plan for MAX_SEQ_LENGTH {max(seq_of(w) for w in self.a.workloads)})")
            print(f"warning: {self.last['checkpointing_note']}", flush=True)
        return tr


class SetupB:
    "The Unsloth Llama 3.1 notebook recipe, with LoRA on q,k,v,o (the issue's targets)."
    def __init__(self, a): self.a = a

    def load(self):
        import unsloth  # noqa: F401  (must come before transformers/trl/peft are used)
        from unsloth import FastLanguageModel
        seq = max(seq_of(wl) for wl in self.a.workloads)
        model, tok = FastLanguageModel.from_pretrained(model_name=str(self.a.model_dir), max_seq_length=seq,
                                                       dtype=None, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, use_gradient_checkpointing='unsloth', random_state=SEED,
                                                 use_rslora=False, loftq_config=None, **LORA)
        return model, tok, dict(load_in_4bit=True, use_gradient_checkpointing='unsloth', max_seq_length=seq)

    def trainer(self, model, tok, ds, workload):
        import torch
        from trl import SFTTrainer  # Unsloth's patched classes once `unsloth` is imported
        args = _sft_config(self.a.out_root/f'b-{workload}', self.a.warmup + self.a.steps, torch.cuda.is_available(), seq_of(workload))
        tr = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args)
        self.last = dict(trainer=type(tr).__name__, packing=getattr(tr.args, 'packing', None),
                         padding_free=getattr(tr.args, 'padding_free', None), max_length=args.max_length)
        return tr


class SetupC:
    "transformers + PEFT + TRL, bitsandbytes 4-bit (the usual QLoRA recipe)."
    quantize = True
    def __init__(self, a): self.a = a

    def load(self):
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        cuda = torch.cuda.is_available()
        kw = dict(dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation='sdpa')
        if cuda: kw['device_map'] = {'': 0}
        if self.quantize and cuda:
            kw['quantization_config'] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(self.a.model_dir), **kw)
        gc_kw = {'use_reentrant': False}
        if self.quantize and cuda:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kw); model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(task_type='CAUSAL_LM', **LORA))
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(self.a.model_dir))
        return model, tok, dict(load_in_4bit=self.quantize and cuda, attn_implementation='sdpa', gradient_checkpointing=True)

    def trainer(self, model, tok, ds, workload):
        import torch
        from trl import SFTTrainer
        args = _sft_config(self.a.out_root/f'{self.a.setup}-{workload}', self.a.warmup + self.a.steps, torch.cuda.is_available(),
                           seq_of(workload), gradient_checkpointing=True, gradient_checkpointing_kwargs={'use_reentrant': False})
        tr = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args)
        self.last = dict(trainer=type(tr).__name__, packing=tr.args.packing, padding_free=tr.args.padding_free, max_length=args.max_length)
        return tr


class SetupC16(SetupC): quantize = False


class SetupAPadded(SetupA):
    "taide_ft with PACKING = auto, micro-batches padded even where the plan would make them padding-free."
    def adjust(self, plan): return dataclasses.replace(plan, padding_free=False)

class SetupAOff(SetupA): overrides = dict(packing='off')
class SetupAGroup(SetupA): overrides = dict(packing='group')
class SetupAPack(SetupA): overrides = dict(packing='on')
class SetupALean(SetupA): overrides = dict(gradient_checkpointing='offload')
class SetupABf16(SetupA): overrides = dict(base_precision='bf16')
class SetupAFp8(SetupA): overrides = dict(base_precision='fp8')


SETUP_CLASSES = {'a': SetupA, 'a-padded': SetupAPadded, 'a-off': SetupAOff, 'a-group': SetupAGroup, 'a-pack': SetupAPack,
                 'a-lean': SetupALean, 'a-bf16': SetupABf16, 'a-fp8': SetupAFp8, 'b': SetupB, 'c': SetupC, 'c16': SetupC16}


def _gib(x): return round(x / 2**30, 2)


def runs(workloads, passes):
    "(result key, workload) for each training run of a worker: later passes over the same rows are WORKLOAD-passN."
    return [(w if p == 1 else f"{w}-pass{p}", w) for p in range(1, passes + 1) for w in workloads]


def bare_loop(tr, steps):
    """What a step costs without the Trainer around it: the trainer's own model, optimizer and batches in a bare
    loop (forward, backward, gradient clipping, optimizer step) with no callbacks, logging or per-step syncs.
    The batches are fetched before timing; the trainer's figure includes fetching and collating them."""
    import torch
    model, opt = tr.model, tr.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    taide = hasattr(tr, 'steps_data')  # taide_ft's trainer: an item is a whole step, its micro-batches and answer tokens
    per = 1 if taide else tr.args.gradient_accumulation_steps
    loader, items = iter(tr.get_train_dataloader()), []
    for _ in range((steps + 1) * per):
        b = next(loader, None)
        if b is None: break
        items.append(tr._prepare_inputs(b))
    if taide:  # the loss over the step's answer tokens, as TaideTrainer.training_step computes it (one process)
        batches = [[(mb, dict(num_items_in_batch=it['answer_tokens']), 1) for mb in it['micro_batches']] for it in items]
    else: batches = [[(b, {}, per) for b in items[s * per:(s + 1) * per]] for s in range(len(items) // per)]
    n = len(batches) - 1
    if n < 1: return dict(error=f"the loader gave {len(items)} items; {2 * per} needed")
    model.train()
    dev = next(p.device for p in model.parameters())
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    def run(first, count):
        real = torch.zeros((), dtype=torch.int64, device=dev)
        for step in batches[first:first + count]:
            for b, kw, div in step:
                (model(**b, **kw).loss / div).backward()
                real += (b['input_ids'] < TOKEN_HI).sum()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(); opt.zero_grad(set_to_none=True)
        return real
    attention = contextlib.nullcontext()
    if taide:  # taide_ft's trainer picks the attention kernels while it trains: the same here
        from taide_ft.training import _attention_for
        attention = _attention_for('packed' if tr.plan.padding_free or tr.plan.batches == 'packed' else 'padded', tr.plan.device == 'cuda')
    with attention:
        run(0, 1)  # warm: the first step after the trainer's loop
        sync()
        t = time.perf_counter()
        real = run(1, n)
        sync()
    secs = time.perf_counter() - t
    return dict(steps=n, seconds_per_step=round(secs / n, 4), tokens_per_s=round(int(real) / secs, 1), real_tokens=int(real))


def traced(a, tr, wl):
    "Trace steps warmup+1 .. warmup+a.profile of trainer `tr` (bench/step_profile.py); returns a function that, after training, gives every process's summary."
    import step_profile as T  # beside this file, on the path of a script run from here
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    path = Path(tempfile.mkdtemp(prefix='taide-trace-'))/f"{a.setup}{f'x{world}' if world > 1 else ''}-{wl}-rank{rank}.json.gz"
    tr.add_callback(T.profile_callback(tr, a.warmup, a.profile, path))
    def summaries():
        try: summary = T.summarize(T.load(path))
        except Exception as e: summary = dict(error=f"{type(e).__name__}: {e}")
        summary['trace_mb'] = round(path.stat().st_size / 2**20, 1) if path.exists() else None
        out = os.environ.get('TAIDE_FT_LOG_DIR')
        if out and path.exists() and path.stat().st_size < 15 * 2**20:
            (Path(out)/'traces').mkdir(parents=True, exist_ok=True); shutil.copy(path, Path(out)/'traces'/path.name)
        import torch.distributed as td
        every = [summary]
        if td.is_available() and td.is_initialized():
            every = [None] * td.get_world_size(); td.all_gather_object(every, summary)
        return {f'rank{i}': x for i, x in enumerate(every)}
    return summaries


def worker(a):
    "Run one setup on every workload; write its figures to a.result after each workload."
    import torch
    res = dict(setup=a.setup, description=SETUPS[a.setup], status='started', workloads={},
               processes=int(os.environ.get('WORLD_SIZE', 1)))
    def save():
        if int(os.environ.get('RANK', 0)) == 0: Path(a.result).write_text(json.dumps(res, indent=1))
    save()
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    setup = SETUP_CLASSES[a.setup](a)
    model, tok, info = setup.load()
    res.update(load_seconds=round(time.perf_counter() - t0, 1), load_info=info, status='loaded')
    if cuda: res['load_peak_gib'] = _gib(torch.cuda.max_memory_allocated())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res['trainable_params'] = trainable
    save()
    # after the timed passes, with --profile, one more run a workload with some steps traced (the profiler slows the CPU)
    for key, wl in runs(a.workloads, a.passes) + [(f'{w}-profile', w) for w in a.workloads if a.profile]:
        ds = make_dataset(wl, a.warmup + a.steps)
        if int(os.environ.get('RANK', 0)) == 0: shutil.rmtree(a.out_root/f'{a.setup}-{wl}', ignore_errors=True)
        gc.collect()
        if cuda: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        tr = setup.trainer(model, tok, ds, wl)
        meter = Meter(tr, a.warmup, a.steps)
        profiled = traced(a, tr, wl) if key.endswith('-profile') else None
        t2 = time.perf_counter()
        out = tr.train()
        r = meter.result()
        if profiled: r['profile'] = profiled()
        r.update(build_trainer_seconds=round(t2 - t1, 1), train_seconds=round(time.perf_counter() - t2, 1),
                 trainer_info=getattr(setup, 'last', {}))
        r['first_step_seconds'] = r['step_seconds'][0] if r.get('step_seconds') else None
        losses = [h['loss'] for h in tr.state.log_history if 'loss' in h]
        r['losses'] = [round(x, 5) for x in losses]
        if a.bare_steps and res['processes'] == 1 and r.get('tokens_per_s') and not profiled:
            try:
                bare = bare_loop(tr, a.bare_steps)
                if bare.get('tokens_per_s'): bare['trainer_overhead'] = round(bare['tokens_per_s'] / r['tokens_per_s'] - 1, 4)
            except Exception as e: bare = dict(error=f"{type(e).__name__}: {e}")
            r['bare_loop'] = bare
        if cuda:
            r['peak_gib'] = _gib(torch.cuda.max_memory_allocated())
            r['peak_reserved_gib'] = _gib(torch.cuda.max_memory_reserved())
        res['workloads'][key] = r  # a later pass replays the same rows, so the same batch shapes
        save()
        del tr, meter, out
        gc.collect()
    res['status'] = 'ok'
    save()


def prepare_worker(a):
    "Measure the bf16 matmul ceiling, and build + save the random-weight model once."
    import torch
    res = dict(status='started')
    def save(): Path(a.result).write_text(json.dumps(res, indent=1))
    cuda = torch.cuda.is_available()
    if cuda:
        p = torch.cuda.get_device_properties(0)
        res.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   gpu_memory_gib=_gib(p.total_memory), cuda=torch.version.cuda)
        n, reps, best = 8192, 50, 0.0
        x = torch.randn(n, n, device='cuda', dtype=torch.bfloat16); y = torch.randn(n, n, device='cuda', dtype=torch.bfloat16)
        z = torch.empty(n, n, device='cuda', dtype=torch.bfloat16)
        for _ in range(10): torch.mm(x, y, out=z)
        trials = []
        for _ in range(7):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(reps): torch.mm(x, y, out=z)
            e.record(); torch.cuda.synchronize()
            t = s.elapsed_time(e) / 1e3
            trials.append(round(2 * n**3 * reps / t / 1e12, 1))
        res['ceiling'] = dict(tflops=max(trials), trials=trials, method=f"torch.mm {n}x{n} @ {n}x{n} bf16, {reps} calls a trial, best of {len(trials)}")
        del x, y, z; torch.cuda.empty_cache()
    save()
    conf = TINY if a.smoke else LLAMA31_8B
    d = Path(a.model_dir)
    res['model_params'] = n_params(conf)
    ok = (d/'config.json').is_file() and (d/'tokenizer.json').is_file() and any(d.glob('*.safetensors'))
    if ok:
        c = json.loads((d/'config.json').read_text())
        ok = all(c.get(k) == conf[k] for k in ('hidden_size', 'num_hidden_layers', 'intermediate_size', 'vocab_size'))
    if ok: res['model'] = f"reused {d}"
    else:
        t0 = time.perf_counter()
        from transformers import LlamaConfig, LlamaForCausalLM
        sys.path.insert(0, str(ROOT))
        from taide_ft.fixtures import llama3_tokenizer_dir
        config = LlamaConfig.from_dict(conf)
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly on the GPU: seconds, not minutes
        try:
            with torch.device('cuda' if cuda else 'cpu'): model = LlamaForCausalLM(config)
        finally: torch.set_default_dtype(old)
        model = model.to(torch.bfloat16)
        res['built_params'] = sum(p.numel() for p in model.parameters())
        tmp = d.with_name(d.name + '.tmp')
        shutil.rmtree(tmp, ignore_errors=True); shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size='5GB')
        llama3_tokenizer_dir(tmp)
        os.replace(tmp, d)
        res['model'] = f"built {d} in {time.perf_counter() - t0:.0f} s"
        del model
    res['status'] = 'ok'
    save()


# ----------------------------------------------------------------------------------------------
# Driver

def run_child(name, argv, timeout, log_dir, result, procs=1):
    "Run one worker (in `procs` processes, through torchrun) in its own process group; kill the group on timeout. Returns (rc, seconds, log path)."
    log = log_dir/f'{name}.log'
    env = dict(os.environ, **OFFLINE_ENV)
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    t0 = time.perf_counter()
    with open(log, 'w') as f:
        launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={procs}'] if procs > 1 else [])
        p = subprocess.Popen(launch + [str(Path(__file__).resolve())] + argv + ['--result', str(result)],
                             stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env, start_new_session=True)
        try: rc = p.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL); p.wait(); rc = 'timeout'
    return rc, round(time.perf_counter() - t0, 1), log


def tail(path, n=25):
    try: return '\n'.join(Path(path).read_text(errors='replace').splitlines()[-n:])
    except OSError: return ''


def versions():
    out = {'python': sys.version.split()[0]}
    for p in ('torch', 'transformers', 'peft', 'trl', 'accelerate', 'datasets', 'bitsandbytes', 'unsloth', 'unsloth_zoo', 'taide_ft'):
        try: out[p] = md.version(p)
        except md.PackageNotFoundError: out[p] = None
    return out


def slug(s): return re.sub(r'[^a-z0-9]+', '-', (s or 'cpu').lower()).strip('-')


def print_table(report):
    ceiling = (report.get('ceiling') or {}).get('tflops')
    N = report['model']['params']
    job = report.get('job', {})
    rows = [('setup', 'workload', 'tokens/s', 's/step', 'rows/step', 'tok/step', f"{job.get('steps')}-step job s",
             f"s / {job.get('rows')} rows", 'pad %', 'peak GiB', 'recompute', 'MFU', 'batches')]
    passes = report['args'].get('passes', 1)
    for s, r in report['results'].items():
        for wl, _ in runs(report['args']['workloads'], passes):
            w = r.get('workloads', {}).get(wl)
            if not w or 'tokens_per_s' not in w:
                rows.append((s, wl, r.get('status', '?') if not w else w.get('error', '?')) + ('',) * 10); continue
            rows.append((s, wl, f"{w['tokens_per_s']:,.0f}", f"{w['seconds_per_step']:.2f}", f"{w['rows_per_step']:g}",
                         f"{w['real_tokens_per_step']:,.0f}", f"{w['job_seconds']:,.1f}", f"{w.get('job_rows_seconds') or 0:,.1f}",
                         f"{100 * (w['padding_share'] or 0):.1f}", f"{w.get('peak_gib', '')}", f"{w.get('flops_per_token_rule', '')}",
                         f"{100 * w['mfu']:.1f}%" if w.get('mfu') is not None else '', '; '.join(w.get('batch_format', []))))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows: print('  '.join(str(c).ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    print(f"\n{job.get('steps')}-step job: {job.get('steps')} optimizer steps as the setup makes them, at the measured seconds a step (warm-up "
          f"and compiling left out); s / {job.get('rows')} rows: the same rows for every setup ({job.get('steps')} x {BATCH * ACCUM}), "
          "at the measured rows a step (differs from the job for a-group and a-pack, whose steps hold more rows).")
    if ceiling: print(f"bf16 matmul ceiling {ceiling} TFLOP/s; N = {N:,} parameters; MFU = tokens/s x FLOPs a token / ceiling, "
                      "FLOPs a token = 6N with activation recomputation (gradient checkpointing), 4N without (attention FLOPs not counted).")
    for k, v in report.get('ratios', {}).items(): print(f"{k}: " + ', '.join(f"{wl} {x:.2f}x" for wl, x in v.items()))
    for key, r in report.get('results', {}).items():
        for wl, w in r.get('workloads', {}).items():
            b = w.get('bare_loop') or {}
            if b.get('tokens_per_s'): print(f"{key} {wl}: bare loop {b['tokens_per_s']:,.0f} tok/s ({b['seconds_per_step']} s a step) -> trainer overhead {100 * b['trainer_overhead']:.1f} %")
            elif b: print(f"{key} {wl}: bare loop {b.get('error')}")
    for key, r in report.get('results', {}).items():
        for wl, w in r.get('workloads', {}).items():
            for rank, p in (w.get('profile') or {}).items():
                m = p.get('mean')
                print(f"{key} {wl} {rank}: " + (f"a step {m['wall_ms']} ms: GPU busy {m['gpu_busy_ms']}, idle {m['gpu_idle_ms']}, NCCL {m['nccl_ms']} "
                      f"(profiled, {p['steps']} steps)" if m else str(p.get('error'))))
    for k, v in report.get('loss_agreement', {}).items(): print(f"loss {k}: " + ', '.join(f"{wl} max relative difference {x['max_rel_diff']:.2e} over {x['steps']} steps" for wl, x in v.items()))
    ab = report.get('a_vs_b')
    if ab:
        t = [('a against b', 'tokens/s a', 'tokens/s b', 'a/b', f"{job.get('steps')}-step job a (s)", 'b (s)', 'a/b')]
        t += [(wl, f"{x['tokens_per_s'][0]:,.0f}", f"{x['tokens_per_s'][1]:,.0f}", f"{x['tokens_per_s_ratio']:.2f}x",
               f"{x['job_seconds'][0]:,.1f}", f"{x['job_seconds'][1]:,.1f}", f"{x['job_seconds_ratio']:.2f}") for wl, x in ab.items()]
        widths = [max(len(r[i]) for r in t) for i in range(len(t[0]))]
        print()
        for r in t: print('  '.join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())


def driver(a):
    start = time.perf_counter()
    deadline = start + a.budget
    stamp = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix='taide-bench-'))
    log_dir = work/'logs'; log_dir.mkdir()
    max_steps = a.warmup + a.steps
    report = dict(date=stamp.isoformat(timespec='seconds'), versions=versions(),
                  args=dict(setups=a.setups, workloads=a.workloads, gpus=a.gpus, warmup=a.warmup, steps=a.steps, bare_steps=a.bare_steps, passes=a.passes, profile=a.profile, budget_s=a.budget,
                            smoke=a.smoke, max_length=a.max_length, model_dir=str(a.model_dir)),
                  recipe=dict(batch=BATCH, grad_accum=ACCUM, max_length={wl: seq_of(wl) for wl in a.workloads}, lora=LORA, seed=SEED,
                              optim='adamw_8bit', learning_rate=2e-4),
                  job=dict(steps=JOB_STEPS, rows=JOB_STEPS * BATCH * ACCUM,
                           job_seconds=f"{JOB_STEPS} x the measured seconds a step (the seed's job: config.ini's MAX_STEPS; a-group "
                                       "and a-pack steps hold more rows)",
                           job_rows_seconds=f"seconds for {JOB_STEPS * BATCH * ACCUM} rows ({JOB_STEPS} x {BATCH} x {ACCUM}) at the "
                                            "measured seconds and rows a step: the same data for every setup"),
                  setups={s: SETUPS[s] for s in a.setups},
                  workloads={wl: workload_spec(wl, max_steps) for wl in a.workloads},
                  model=dict(config=TINY if a.smoke else LLAMA31_8B, params=n_params(TINY if a.smoke else LLAMA31_8B)),
                  results={})
    for wl in a.workloads:
        report['workloads'][wl]['stats'] = row_stats(*make_rows(wl, rows_needed(wl, max_steps)))

    name = None
    def finish(final=True):
        nonlocal name
        N = report['model']['params']
        ceiling = (report.get('ceiling') or {}).get('tflops')
        for r in report['results'].values():
            for w in r.get('workloads', {}).values():
                if 'tokens_per_s' not in w: continue
                k = 6 if w.get('recompute') is not False else 4
                w['flops_per_token_rule'] = f"{k}N"
                w['mfu'] = round(w['tokens_per_s'] * k * N / (ceiling * 1e12), 4) if ceiling else None
        ratios = {}
        res = report['results']
        for other in ('b', 'c', 'c16'):
            if 'a' in res and other in res:
                q, t = {}, {}
                for wl in a.workloads:
                    x, y = res['a'].get('workloads', {}).get(wl, {}), res[other].get('workloads', {}).get(wl, {})
                    if x.get('tokens_per_s') and y.get('tokens_per_s'): q[wl] = round(x['tokens_per_s'] / y['tokens_per_s'], 3)
                    if x.get('job_rows_seconds') and y.get('job_rows_seconds'): t[wl] = round(x['job_rows_seconds'] / y['job_rows_seconds'], 3)
                    if other == 'b' and wl in q and wl in t:
                        report.setdefault('a_vs_b', {})[wl] = dict(
                            tokens_per_s=[x['tokens_per_s'], y['tokens_per_s']], tokens_per_s_ratio=q[wl],
                            job_seconds=[x['job_rows_seconds'], y['job_rows_seconds']], job_seconds_ratio=t[wl])
                if q: ratios[f"tokens/s a/{other}"] = q
                if t: ratios[f"seconds for the job's rows a/{other}"] = t
        for key in res:
            m = re.fullmatch(r'(a[\w-]*)x(\d+)', key)
            if not m or m.group(1) not in res: continue
            q, loss = {}, {}
            for wl, _ in runs(a.workloads, a.passes):
                x, y = res[key].get('workloads', {}).get(wl, {}), res[m.group(1)].get('workloads', {}).get(wl, {})
                if x.get('tokens_per_s') and y.get('tokens_per_s'): q[wl] = round(x['tokens_per_s'] / y['tokens_per_s'], 3)
                if x.get('losses') and y.get('losses'):
                    d = [abs(u - v) / abs(v) for u, v in zip(x['losses'], y['losses'])]
                    loss[wl] = dict(steps=len(d), max_rel_diff=round(max(d), 5), mean_rel_diff=round(sum(d) / len(d), 5))
            if q: ratios[f"tokens/s {key}/{m.group(1)}"] = q
            if loss: report.setdefault('loss_agreement', {})[f"{key} vs {m.group(1)}"] = loss
        report['ratios'] = ratios
        report['total_seconds'] = round(time.perf_counter() - start, 1)
        res_dir = HERE/'results'; res_dir.mkdir(exist_ok=True)
        if name is None:
            base = f"{stamp.date().isoformat()}-{slug(report.get('gpu'))}"
            name, i = base, 2
            while (res_dir/f'{name}.json').exists(): name = f'{base}-{i}'; i += 1
        path = res_dir/f'{name}.json'
        report['complete'] = final
        text = json.dumps(report, indent=1)
        path.write_text(text)
        out = os.environ.get('TAIDE_FT_LOG_DIR')
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out)/path.name).write_text(text)
            shutil.copytree(log_dir, Path(out)/'bench-logs', dirs_exist_ok=True)
        if not final: return
        print_table(report)
        print(f"\nwrote {path}" + (f" and {Path(out)/path.name}" if out else '') + f"; logs in {log_dir}")

    print(f"bench: setups {','.join(a.setups)}; workloads {','.join(a.workloads)}; {a.warmup} warm-up + {a.steps} measured steps; "
          f"budget {a.budget} s; model {a.model_dir}", flush=True)
    common = ['--model-dir', str(a.model_dir), '--max-length', str(a.max_length), '--warmup', str(a.warmup), '--steps', str(a.steps), '--bare-steps', str(a.bare_steps), '--passes', str(a.passes), '--profile', str(a.profile),
              '--workloads', ','.join(a.workloads), '--out-root', str(a.out_root)] + (['--smoke'] if a.smoke else [])
    pres = work/'prepare.json'
    rc, secs, log = run_child('prepare', ['--_prepare'] + common, min(a.build_timeout, deadline - time.perf_counter()), log_dir, pres)
    prep = json.loads(pres.read_text()) if pres.is_file() else {}
    report.update(gpu=prep.get('gpu'), capability=prep.get('capability'), gpu_memory_gib=prep.get('gpu_memory_gib'),
                  cuda=prep.get('cuda'), ceiling=prep.get('ceiling'), model_build=dict(prep.get('model') and {'what': prep['model']} or {}, seconds=secs, rc=rc))
    print(f"prepare: rc {rc} in {secs} s: {prep.get('gpu')}, ceiling {(prep.get('ceiling') or {}).get('tflops')} TFLOP/s, {prep.get('model')}", flush=True)
    if rc != 0 or prep.get('status') != 'ok':
        print(tail(log)); report['error'] = f"prepare failed (rc {rc})"; finish(); return 1
    if a.prepare_only: return 0
    queue = [(s, 1) for s in a.setups if 1 in a.gpus or not s.startswith('a')]
    queue += [('a', n) for n in a.gpus if n > 1 if 'a' in a.setups]  # scaling: the default path on n GPUs
    for s, n in queue:
        key = s if n == 1 else f"{s}x{n}"
        left = deadline - time.perf_counter()
        if left < 45:
            report['results'][key] = dict(status=f"skipped: {left:.0f} s of the budget left"); print(f"{key}: skipped (budget)"); continue
        rpath = work/f'{key}.json'
        rc, secs, log = run_child(key, ['--_worker', s] + common, min(a.setup_timeout, left - 5), log_dir, rpath, procs=n)
        s = key
        r = json.loads(rpath.read_text()) if rpath.is_file() else dict(status='no result')
        r.update(rc=rc, wall_seconds=secs)
        if rc != 0:
            r['status'] = f"failed (rc {rc}) after {r.get('status')}"; r['log_tail'] = tail(log, 40)
            print(f"{s}: {r['status']}\n{r['log_tail']}", flush=True)
        else:
            print(f"{s}: ok in {secs} s (load {r.get('load_seconds')} s): " + ', '.join(
                f"{wl} {w.get('tokens_per_s', w.get('error'))} tok/s, {w.get('job_seconds')} s for {JOB_STEPS} steps" for wl, w in r.get('workloads', {}).items()), flush=True)
        report['results'][s] = r
        finish(final=False)  # keep what is done if a later setup runs past the machine's limit
    finish()
    return 0


def dry_run(a):
    max_steps = a.warmup + a.steps
    print(f"setups: " + '; '.join(f"{s}: {SETUPS[s]}" for s in a.setups))
    print(f"recipe: batch {BATCH} x accumulation {ACCUM}, LoRA {LORA}, {a.warmup} warm-up + {a.steps} measured steps; "
          f"the job: {JOB_STEPS} steps of {BATCH * ACCUM} rows")
    shape = TINY if a.smoke else LLAMA31_8B
    print(f"model: {'tiny' if a.smoke else 'Llama-3.1-8B-shaped'}, N = {n_params(shape):,} parameters, at {a.model_dir}")
    for wl in a.workloads:
        ids, labels = make_rows(wl, rows_needed(wl, max_steps))
        print(f"\nworkload {wl}: {json.dumps(workload_spec(wl, max_steps))}")
        print('  ' + json.dumps(row_stats(ids, labels)))
        ids2, _ = make_rows(wl, rows_needed(wl, max_steps))
        assert ids2 == ids, "rows must be the same in every process"
        lengths = [len(x) for x in ids]
        assert max(max(x) for x in ids) < TOKEN_HI and max(lengths) <= seq_of(wl) and min(lengths) >= (seq_of(wl) if wl == 'full' else MIX_MIN)
    ours = [s for s in a.setups if s.startswith('a')]
    if not ours: return 0
    sys.path.insert(0, str(ROOT))
    from taide_ft.config import load_config
    from taide_ft.environment import GPU, BaseModel, ConfigError, Machine, make_plan, probe_machine
    ini = load_config(ROOT/'config.ini', check_files=False).train
    if (ini.per_device_train_batch_size, ini.gradient_accumulation_steps, ini.max_steps) != (BATCH, ACCUM, JOB_STEPS):
        print(f"\nwarning: config.ini has {ini.per_device_train_batch_size} x {ini.gradient_accumulation_steps} rows, {ini.max_steps} steps; "
              f"the benchmark's b and c setups and the job use {BATCH} x {ACCUM}, {JOB_STEPS}")
    # the model as bench builds it (whether or not it is there yet), on this machine and on an H200 as the plan would see it
    base = BaseModel(str(a.model_dir), 'folder', str(a.model_dir), shape, float(n_params(shape)))
    h200 = Machine(gpus=(GPU('NVIDIA H200', 139.8, 139.3, (9, 0)),), bf16=True, unsloth=True, bitsandbytes=True, torchao=True, cpus=16,
                   ram_gib=120.0, cuda_version='12.8', varlen=True)
    for where, machine in (('this machine', probe_machine()), ('an H200 with Unsloth and varlen attention (assumed: 139.3 GiB free)', h200)):
        print(f"\nplans on {where}:")
        for s in ours:
            setup = SETUP_CLASSES[s](a)
            for wl in a.workloads:
                cfg = a_config(a, setup.overrides, seq_of(wl), a.out_root/f'{s}-{wl}')
                for n in a.gpus:
                    print(f"  ({s}, {wl}{f', {n} processes' if n > 1 else ''}) PACKING = {cfg.train.packing}, "
                          f"GRADIENT_CHECKPOINTING = {cfg.train.gradient_checkpointing}, MAX_SEQ_LENGTH = {cfg.model.max_seq_length}")
                    try: print('    ' + repr(setup.adjust(make_plan(cfg, machine, base, processes=n))).replace('\n', '\n    '))
                    except ConfigError as e: print(f"    cannot run: {e}")
    return 0


DEFAULT_SETUPS, SMOKE_SETUPS = 'a,a-padded,a-off,b,c', 'a,a-padded,a-off'


def parse(argv=None):
    global MAX_LENGTH
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Setups: " + '; '.join(f"{k}: {v}" for k, v in SETUPS.items()))
    p.add_argument('--setups', default=None, help=f"comma-separated, from {','.join(SETUPS)} (a-pad: a-off's old name) "
                   f"(default {DEFAULT_SETUPS}; with --smoke {SMOKE_SETUPS})")
    p.add_argument('--gpus', default='1', help="comma-separated GPU counts, e.g. 1,2: each count above 1 runs setup a again with one "
                   "process a GPU through torchrun and the same global batch, reported as a x N (default 1)")
    p.add_argument('--workloads', default='full,mix4k', help=f"comma-separated, from {','.join(WORKLOADS)} (default full,mix4k)")
    p.add_argument('--warmup', type=int, default=2, help="optimizer steps before timing starts (default 2)")
    p.add_argument('--steps', type=int, default=5, help="timed optimizer steps (default 5)")
    p.add_argument('--model-dir', type=Path, default=None, help="random-weight model folder, built once if missing "
                   "(default /dev/shm/llama8b, or /dev/shm/llama-tiny-bench with --smoke)")
    p.add_argument('--out-root', type=Path, default=Path('/dev/shm/bench-out'), help="trainer output folders (default /dev/shm/bench-out)")
    own = ', '.join(f"{k} {v['seq']}" for k, v in WORKLOADS.items())
    p.add_argument('--max-length', type=int, default=0, help=f"caps every workload's MAX_SEQ_LENGTH and rows (default 0: the "
                   f"workload's own: {own}; lower only for quick checks)")
    p.add_argument('--smoke', action='store_true', help="a tiny model of the same vocabulary instead of the 8B shape (runs on a CPU)")
    p.add_argument('--prepare-only', action='store_true', help="only measure the matmul ceiling and build the model (e.g. in a first, separate call)")
    p.add_argument('--dry-run', action='store_true', help="build the workloads, print their statistics and the plan; no GPU needed")
    p.add_argument('--budget', type=float, default=540, help="seconds for the whole run; setups that would start later are skipped (default 540)")
    p.add_argument('--setup-timeout', type=float, default=240, help="seconds for one setup's process (default 240)")
    p.add_argument('--build-timeout', type=float, default=300, help="seconds for the matmul ceiling + model build (default 300)")
    p.add_argument('--bare-steps', type=int, default=0, help="after each one-GPU workload, time this many steps of the same model, "
                   "optimizer and batches in a bare loop, and report the trainer's overhead against it (default 0: off)")
    p.add_argument('--passes', type=int, default=1, help="train each workload this many times in the same process; later passes "
                   "(reported as WORKLOAD-passN) meet batch shapes the first has already run (default 1)")
    p.add_argument('--profile', type=int, default=0, help="after the passes, train each workload once more with the N steps after "
                   "the warm-up traced by torch's profiler (bench/step_profile.py), reported as WORKLOAD-profile: where each step's time goes, "
                   "per process (default 0: off)")
    p.add_argument('--_worker', dest='worker', help=argparse.SUPPRESS)
    p.add_argument('--_prepare', dest='prepare', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--result', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.setups = [ALIASES.get(s.strip(), s.strip()) for s in (a.setups or (SMOKE_SETUPS if a.smoke else DEFAULT_SETUPS)).split(',') if s.strip()]
    a.workloads = [w.strip() for w in a.workloads.split(',') if w.strip()]
    a.gpus = sorted({int(x) for x in str(a.gpus).split(',') if x.strip()})
    if not a.gpus or min(a.gpus) < 1: p.error("--gpus takes counts of 1 or more, e.g. 1,2")
    bad = [s for s in a.setups if s not in SETUPS] + [w for w in a.workloads if w not in WORKLOADS]
    if bad: p.error(f"unknown setup or workload: {', '.join(bad)}")
    if a.warmup < 1 or a.steps < 1 or a.passes < 1: p.error("--warmup, --steps and --passes must be at least 1")
    if not 0 <= a.profile <= a.steps: p.error("--profile N traces N of the measured steps: 0 to --steps")
    if a.model_dir is None: a.model_dir = Path('/dev/shm/llama-tiny-bench' if a.smoke else '/dev/shm/llama8b')
    if a.worker: a.setup = a.worker
    MAX_LENGTH = a.max_length  # read at call time by seq_of
    return a


def main(argv=None):
    a = parse(argv)
    if a.prepare: return prepare_worker(a)
    if a.worker:
        sys.path.insert(0, str(ROOT))
        return worker(a)
    if a.dry_run: return dry_run(a)
    return driver(a)


if __name__ == '__main__':
    sys.exit(main())
