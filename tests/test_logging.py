"""Every error and warning of `taide-ft` lands in OUTPUT_DIR/finetune.log as well as on screen, failures before training
included: a bad config.ini (once it names OUTPUT_DIR), bad data, a model folder that cannot be read, a problem found by
`check`, and an error no check foresaw (with its traceback)."""
import os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    r = subprocess.run([sys.executable, '-m', 'taide_ft', *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE='1'))
    return r, r.stdout + r.stderr


def project(tmp_path, ini, rows=None):
    from taide_ft.fixtures import tiny_llama
    if not (tmp_path/'tiny').exists(): tiny_llama(tmp_path/'tiny')
    rows = rows or [f'{{"instruction": "q{i}", "output": "a{i}"}}' for i in range(12)]
    (tmp_path/'train_data.jsonl').write_text('\n'.join(rows) + '\n', encoding='utf-8')
    (tmp_path/'config.ini').write_text("[Model]\nBASE_MODEL_NAME = tiny\nMAX_SEQ_LENGTH = 128\n[Training]\nOUTPUT_DIR = out\nMAX_STEPS = 2\nWARMUP_STEPS = 0\n" + ini, encoding='utf-8')
    return tmp_path/'config.ini', tmp_path/'out'/'finetune.log'


def test_config_error_reaches_the_log(tmp_path):
    ini, logf = project(tmp_path, "[LoRA]\nR = 0\n")
    r, out = run('run', '--config', str(ini), cwd=tmp_path)
    assert r.returncode == 2 and "[LoRA] R = '0' (config.ini): must be ≥ 1" in r.stdout, out
    text = logf.read_text(encoding='utf-8')
    assert "ERROR   ConfigError: " in text and "[LoRA] R = '0' (config.ini): must be ≥ 1" in text, text
    r, out = run('check', '--config', str(ini), cwd=tmp_path)  # check too, and the log grows
    assert r.returncode == 2 and logf.read_text(encoding='utf-8').count("[LoRA] R = '0'") == 2, out


def test_data_error_and_check_warnings_reach_the_log(tmp_path):
    ini, logf = project(tmp_path, "", rows=['{"instruction": "q", "output": "a"}', '{"instruction": "q2"}'] + [f'{{"instruction": "q{i}", "output": "a{i}"}}' for i in range(10)])
    r, out = run('check', '--config', str(ini), cwd=tmp_path)
    assert r.returncode == 1 and 'line 2' in r.stdout, out
    text = logf.read_text(encoding='utf-8')
    assert 'line 2' in text and 'ERROR' in text and 'less than one pass' not in text, text
    r, out = run('run', '--config', str(ini), cwd=tmp_path)
    assert r.returncode != 0 and 'DataError: ' in r.stdout and 'Traceback' not in out, out
    assert logf.read_text(encoding='utf-8').count('DataError: ') == 1
    ini.write_text(ini.read_text().replace('MAX_STEPS = 2', 'MAX_STEPS = 1'), encoding='utf-8')
    (tmp_path/'train_data.jsonl').write_text(''.join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(50)), encoding='utf-8')
    r, out = run('check', '--config', str(ini), cwd=tmp_path)
    assert r.returncode == 0 and 'less than one pass over the data' in r.stdout, out
    assert 'WARNING 1 steps x 8 rows' in logf.read_text(encoding='utf-8')


def test_unreadable_model_reaches_the_log_with_its_traceback(tmp_path):
    ini, logf = project(tmp_path, "")
    (tmp_path/'tiny'/'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00not a header....')
    r, out = run('run', '--config', str(ini), cwd=tmp_path)
    assert r.returncode != 0, out
    text = logf.read_text(encoding='utf-8')
    assert 'ERROR' in text and 'Traceback (most recent call last)' in text, text
    last = [l for l in r.stderr.strip().splitlines() if l.strip()][-1]
    assert last.split(':')[0] in text, (last, text)
