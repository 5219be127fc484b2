"Every config.ini validation rule, the override order, the CLI's exit codes, and a light `import taide_ft`."
import subprocess, sys, textwrap
from pathlib import Path
import pytest
from taide_ft.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = (ROOT/'config.ini').read_text(encoding='utf-8')


def write(tmp_path, text, data=True):
    (tmp_path/'config.ini').write_text(textwrap.dedent(text), encoding='utf-8')
    if data: (tmp_path/'train_data.jsonl').write_text('{"instruction": "q", "output": "a"}\n', encoding='utf-8')
    return tmp_path/'config.ini'


def with_value(tmp_path, key, value):
    "The shipped config.ini with one line changed."
    lines = [f"{key} = {value}" if l.split('=')[0].strip() == key else l for l in BASE.splitlines()]
    return write(tmp_path, '\n'.join(lines))


def problems(path, **kw):
    with pytest.raises(ConfigError) as e: load_config(path, **kw)
    return str(e.value)


def test_shipped_config_has_the_seed_defaults():
    cfg = load_config(ROOT/'config.ini', check_files=False)
    assert cfg.model.base_model_name == 'taide/Llama-3.1-TAIDE-LX-8B-Chat'
    assert (cfg.model.new_model_name, cfg.model.max_seq_length) == ('KCWen/taide', 4096)
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout, cfg.lora.bias) == (16, 16, 0.0, 'none')
    assert cfg.lora.target_modules == ['q_proj', 'k_proj', 'v_proj', 'o_proj']
    assert cfg.data.dataset_file == ROOT/'train_data.jsonl'
    t = cfg.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.learning_rate, t.max_steps, t.warmup_steps,
            t.logging_steps) == (2, 4, 2e-4, 60, 5, 1)
    assert t.output_dir == ROOT/'outputs'
    assert (cfg.quant.load_in_4bit, cfg.quant.quantization_method, cfg.hardware.auto_fp16_bf16) == (True, ['q4_k_m'], True)


def test_every_key_has_a_comment_with_type_and_default():
    lines = BASE.splitlines()
    for i, line in enumerate(lines):
        if '=' in line and not line.startswith('#'):
            key = line.split('=')[0].strip()
            j, block = i - 1, []
            while j >= 0 and lines[j].startswith('#'): block.append(lines[j]); j -= 1
            assert any('default' in c for c in block), f"{key} lacks a '# type, default ...' comment"


@pytest.mark.parametrize('key,value,expect', [
    ('R', 'sixteen', "[LoRA] R = 'sixteen' (config.ini): must be a whole number ≥ 1"),
    ('PER_DEVICE_TRAIN_BATCH_SIZE', '2.5', "[Training] PER_DEVICE_TRAIN_BATCH_SIZE = '2.5' (config.ini): must be a whole number"),
    ('LORA_DROPOUT', '1.5', "[LoRA] LORA_DROPOUT = '1.5' (config.ini): must be in [0, 1]"),
    ('LORA_DROPOUT', '-0.1', "must be in [0, 1]"),
    ('MAX_SEQ_LENGTH', '0', "[Model] MAX_SEQ_LENGTH = '0' (config.ini): must be ≥ 16"),
    ('GRADIENT_ACCUMULATION_STEPS', '0', "GRADIENT_ACCUMULATION_STEPS = '0' (config.ini): must be ≥ 1"),
    ('MAX_STEPS', '-3', "MAX_STEPS = '-3' (config.ini): must be ≥ 1"),
    ('LEARNING_RATE', '0', "LEARNING_RATE = '0' (config.ini): must be in (0, 1]"),
    ('LEARNING_RATE', 'fast', "must be a number"),
    ('BIAS', 'some', "[LoRA] BIAS = 'some' (config.ini): must be one of none, all, lora_only"),
    ('QUANTIZATION_METHOD', 'q4_km', "`q4_km` is not a llama.cpp type; use one of f32, f16"),
    ('QUANTIZATION_METHOD', 'q4_km', "(did you mean `q4_k_m`?)"),
    ('LOAD_IN_4BIT', 'maybe', "[Quantization] LOAD_IN_4BIT = 'maybe' (config.ini): must be true or false"),
    ('AUTO_FP16_BF16', '2', "must be true or false (also yes/no, 1/0)"),
    ('TARGET_MODULES', '', "[LoRA] TARGET_MODULES = '' (config.ini): must list at least one name"),
    ('WARMUP_STEPS', '60', "[Training] WARMUP_STEPS = 60 must be less than MAX_STEPS = 60"),
    ('DATASET_FILE', 'missing.jsonl', "[Dataset] DATASET_FILE = "),
    ('BACKEND', 'unslot', "(did you mean `unsloth`?)"),
])
def test_each_rule_names_key_value_and_fix(tmp_path, key, value, expect):
    assert expect in problems(with_value(tmp_path, key, value))


@pytest.mark.parametrize('value', ['true', 'yes', '1', 'on', 'TRUE', 'false', 'no', '0', 'off'])
def test_booleans(tmp_path, value):
    assert load_config(with_value(tmp_path, 'LOAD_IN_4BIT', value)).quant.load_in_4bit == (value.lower() in ('true', 'yes', '1', 'on'))


def test_all_problems_at_once(tmp_path):
    msg = problems(write(tmp_path, "[LoRA]\nR = x\nBIAS = y\n[Training]\nMAX_STEPS = z\n"))
    assert msg.startswith(f"{tmp_path/'config.ini'}: 3 problems:")
    assert all(s in msg for s in ("R = 'x'", "BIAS = 'y'", "MAX_STEPS = 'z'"))


def test_unknown_names_suggest_the_nearest(tmp_path):
    msg = problems(write(tmp_path, "[Model]\nMAX_SEQ_LENGHT = 1\n[Trainig]\nX = 1\n[Dataset]\nDATASET_FLIE = a\n"))
    assert "unknown key `MAX_SEQ_LENGHT` in [Model] (did you mean `MAX_SEQ_LENGTH`?)" in msg
    assert "unknown section [Trainig] (did you mean `Training`?)" in msg
    assert "(did you mean `DATASET_FILE`?)" in msg


def test_malformed_ini(tmp_path):
    assert "config.ini line 1: `R = 16` comes before any [Section] header" in problems(write(tmp_path, "R = 16\n"))
    assert "line 3: key `R` in [LoRA] appears twice" in problems(write(tmp_path, "[LoRA]\nR = 1\nR = 2\n"))
    assert "line 2: cannot read `just words`" in problems(write(tmp_path, "[LoRA]\njust words\n"))
    assert "not found" in problems(tmp_path/'none.ini')


def test_unwritable_output_dir(tmp_path):
    (tmp_path/'blocker').write_text('a file')
    msg = problems(write(tmp_path, "[Training]\nOUTPUT_DIR = blocker/out\n"))
    assert "[Training] OUTPUT_DIR = " in msg and "is a file, not a folder" in msg and "Choose a folder you can write to" in msg


def test_override_order_and_sources(tmp_path):
    ini = write(tmp_path, "[Training]\nMAX_STEPS = 10\n")
    assert load_config(ini).train.max_steps == 10
    assert load_config(ini, max_steps=20).train.max_steps == 20
    assert load_config(ini, MAX_STEPS=20, params={'MAX_STEPS': 30}).train.max_steps == 30
    cfg = load_config(ini, max_steps=20, params={'MAX_STEPS': 30, 'R': None}, sets=['Training.MAX_STEPS=40'])
    assert cfg.train.max_steps == 40 and cfg.sources['Training.MAX_STEPS'] == '--set'
    assert cfg.lora.r == 16 and cfg.sources['LoRA.R'] == 'default'
    assert 'config.ini' == load_config(ini).sources['Training.MAX_STEPS']


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    sub = tmp_path/'proj'; sub.mkdir()
    ini = write(sub, "[Dataset]\nDATASET_FILE = train_data.jsonl\n[Training]\nOUTPUT_DIR = out\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config('proj/config.ini')
    assert cfg.data.dataset_file == sub/'train_data.jsonl' and cfg.train.output_dir == sub/'out'


def test_summary_lists_every_value_and_source(tmp_path):
    cfg = load_config(write(tmp_path, "[LoRA]\nR = 8\n"), sets=['Training.MAX_STEPS=7'])
    s = cfg.summary()
    row = next(l for l in s.splitlines() if l.split()[:2] == ['LoRA', 'R'])
    assert row.split()[2:] == ['8', 'config.ini']
    row = next(l for l in s.splitlines() if l.split()[:2] == ['Training', 'MAX_STEPS'])
    assert row.split()[2:] == ['7', '--set']


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, '-m', 'taide_ft', *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_check_passes_on_the_shipped_config_offline():
    r = cli('check', '--config', 'config.ini')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'OK: the run can start.' in r.stdout and 'BASE_MODEL_NAME' in r.stdout
    assert 'Traceback' not in r.stdout + r.stderr


def test_cli_check_fails_cleanly_on_bad_config(tmp_path):
    ini = with_value(tmp_path, 'R', 'sixteen')
    r = cli('check', '--config', str(ini), '--set', 'Training.MAX_STEPS=abc')
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert "[LoRA] R = 'sixteen'" in out and "MAX_STEPS = 'abc' (--set)" in out and 'Traceback' not in out


def test_import_is_light():
    code = ("import sys, time; t = time.perf_counter(); import taide_ft, taide_ft.config, taide_ft.environment, taide_ft.cli;"
            "print(time.perf_counter() - t); print(sorted(m for m in ('unsloth', 'trl', 'bitsandbytes', 'torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    seconds, loaded = r.stdout.splitlines()
    assert float(seconds) < 1.0, seconds
    assert loaded == '[]', loaded
