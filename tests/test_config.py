"Every config.ini validation rule, the override order, papermill parameters, the error classes, `taide-ft check`, and a light `import taide_ft`."
import os, re, subprocess, sys, textwrap
from pathlib import Path
import pytest
from taide_ft.config import ConfigError, TaideError, load_config, pick_params

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
    assert (t.num_epochs, t.save_steps, t.resume, t.seed, t.gradient_checkpointing, t.packing) == (0.0, 20, True, 3407, 'auto', 'auto')
    assert cfg.hardware.backend == 'auto'
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
    ('NUM_EPOCHS', '-1', "[Training] NUM_EPOCHS = '-1' (config.ini): must be in [0, 1000]; 0 trains MAX_STEPS steps"),
    ('NUM_EPOCHS', 'two', "[Training] NUM_EPOCHS = 'two' (config.ini): must be a number [0, 1000]"),
    ('PACKING', 'yes', "[Training] PACKING = 'yes' (config.ini): must be one of auto, group, on, off"),
    ('DATASET_FILE', 'missing.jsonl', "[Dataset] DATASET_FILE = "),
    ('BACKEND', 'unslot', "(did you mean `unsloth`?)"),
    ('REPORT_TO', 'tensorbord', "[Training] REPORT_TO = 'tensorbord' (config.ini): `tensorbord` is not a tracker; use none, or one or more of tensorboard, wandb, mlflow"),
    ('REPORT_TO', 'wandb,none', "`none` is not a tracker"),
    ('PUSH_TO_HUB', 'sure', "[Model] PUSH_TO_HUB = 'sure' (config.ini): must be true or false"),
])
def test_each_rule_names_key_value_and_fix(tmp_path, key, value, expect):
    assert expect in problems(with_value(tmp_path, key, value))


@pytest.mark.parametrize('value', ['true', 'yes', '1', 'on', 'TRUE', 'false', 'no', '0', 'off'])
def test_booleans(tmp_path, value):
    assert load_config(with_value(tmp_path, 'LOAD_IN_4BIT', value)).quant.load_in_4bit == (value.lower() in ('true', 'yes', '1', 'on'))


def test_num_epochs_replaces_max_steps(tmp_path):
    "NUM_EPOCHS > 0 decides the length of the run: WARMUP_STEPS is then not held against MAX_STEPS."
    cfg = load_config(with_value(tmp_path, 'NUM_EPOCHS', '2.5'), warmup_steps=80)
    assert (cfg.train.num_epochs, cfg.train.max_steps, cfg.train.warmup_steps) == (2.5, 60, 80)
    assert "WARMUP_STEPS = 80 must be less than MAX_STEPS = 60" in problems(with_value(tmp_path, 'NUM_EPOCHS', '0'), warmup_steps=80)


def test_papermill_parameters():
    "`pick_params(globals())`: the config keys set in a notebook; an upper-case name that is no key is refused, by name."
    ns = {'CONFIG': 'config.ini', 'MAX_STEPS': 3, 'R': None, 'cfg': object(), 'In': [], '_X': 1}
    assert pick_params(ns) == {'MAX_STEPS': 3, 'R': None}
    with pytest.raises(ConfigError) as e: pick_params({'CONFIG': '', 'MAX_STEP': 3, 'NO_SUCH_PARAM': 1})
    msg = str(e.value)
    assert msg.startswith('papermill: 2 problems:') and e.value.exit_code == 2
    assert "papermill: unknown parameter `MAX_STEP` (did you mean `MAX_STEPS`?)" in msg
    assert "papermill: unknown parameter `NO_SUCH_PARAM`. Parameters are CONFIG and the keys of config.ini: BASE_MODEL_NAME, " in msg
    assert pick_params({'DATA': 1}, others=('CONFIG', 'DATA')) == {}


def test_every_user_error_is_a_taide_error():
    "One base class: `taide-ft` and notebooks show each as `ClassName: message`, and the CLI exits with its code."
    from taide_ft.environment import ModelError
    from taide_ft.export import ExportError
    from taide_ft.model import ModelError as ModelError2
    from taide_ft.training import GPUOutOfMemory, TrainingDiverged, TrainingInterrupted
    assert ModelError2 is ModelError
    codes = {c: c.exit_code for c in (ConfigError, ModelError, ExportError, TrainingDiverged, GPUOutOfMemory, TrainingInterrupted)}
    assert all(issubclass(c, TaideError) for c in codes)
    assert codes == {ConfigError: 2, ModelError: 1, ExportError: 1, TrainingDiverged: 1, GPUOutOfMemory: 1, TrainingInterrupted: 130}
    assert issubclass(ConfigError, ValueError) and issubclass(TrainingInterrupted, KeyboardInterrupt)  # Ctrl-C handlers still catch it
    e = ConfigError(['one', 'two'], 'x.ini')
    assert str(e) == 'x.ini: 2 problems:\n  - one\n  - two' and e.problems == ['one', 'two']
    assert e._render_traceback_() == ['ConfigError: x.ini: 2 problems:\n  - one\n  - two']  # what a notebook shows


def test_data_error_is_a_taide_error():
    from taide_ft.dataset import DataError
    assert issubclass(DataError, TaideError) and issubclass(DataError, ValueError) and DataError.exit_code == 1


LLAMA_8B = dict(model_type='llama', hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072)


def plan_for(tmp_path, machine=None, processes=1, **kw):
    "The plan for config.ini values `kw` on `machine` (default: no GPU) with an 8B Llama base; nothing is loaded."
    from taide_ft.environment import BaseModel, Machine, make_plan
    cfg = load_config(write(tmp_path, "[Model]\nMAX_SEQ_LENGTH = 1024\n"), **kw)
    return make_plan(cfg, machine or Machine(cpus=2, ram_gib=16), BaseModel('x/y-8B', 'folder', '/x', LLAMA_8B, 8.03e9), processes)


def h200(free=139.0, **kw):
    from taide_ft.environment import GPU, Machine
    return Machine(**dict(dict(gpus=(GPU('NVIDIA H200', 139.8, free, (9, 0)),), bf16=True, unsloth=True, bitsandbytes=True, varlen=True), **kw))


def test_plan_on_the_cpu(tmp_path):
    "No GPU: transformers in float32, full-precision base, PACKING's layout, a micro-batch of B x MAX_SEQ_LENGTH tokens."
    import dataclasses
    p = plan_for(tmp_path)
    assert (p.backend, p.device, p.dtype, p.load_in_4bit, p.processes, p.checkpointing) == ('transformers', 'cpu', 'float32', False, 1, False)
    assert (p.batches, p.rows_per_step, p.accumulation, p.micro_tokens, p.padding_free) == ('sorted', 8, None, 2 * 1024, False)
    with pytest.raises(dataclasses.FrozenInstanceError): p.batches = 'padded'
    layouts = {m: plan_for(tmp_path, packing=m) for m in ('off', 'group', 'on')}
    assert {m: (q.batches, q.rows_per_step, q.accumulation, q.padding_free) for m, q in layouts.items()} == {
        'off': ('padded', 8, 4, False), 'group': ('grouped', None, 4, False), 'on': ('packed', None, 4, True)}
    assert plan_for(tmp_path, gradient_checkpointing='on').checkpointing is True
    assert dict(p.rows())['a step'] == '8 rows; micro-batches sorted, as few as fit, padded, up to 2,048 tokens each'
    msg = problems_of(lambda: plan_for(tmp_path, backend='unsloth'))
    assert "[Hardware] BACKEND = unsloth needs a CUDA GPU, and none is visible here" in msg


def problems_of(call):
    with pytest.raises(ConfigError) as e: call()
    return str(e.value)


def test_plan_on_a_gpu(tmp_path):
    """A GPU: Unsloth when installed, bf16, 4-bit base; activations fit without checkpointing on a big GPU, and a step's
    micro-batch holds the whole step; on a small one, checkpointing on and a smaller micro-batch, never below one row."""
    p = plan_for(tmp_path, h200())
    assert (p.backend, p.device, p.dtype, p.load_in_4bit, p.checkpointing) == ('unsloth', 'cuda', 'bfloat16', True, False)
    assert (p.batches, p.rows_per_step, p.micro_tokens, p.padding_free) == ('sorted', 8, 8 * 1024, True)  # Unsloth's variable-length attention
    assert p.memory.startswith('auto: 139.0 GiB free')
    assert not plan_for(tmp_path, h200(varlen=False)).padding_free
    small = plan_for(tmp_path, h200(free=8.0))
    assert small.checkpointing == 'unsloth' and 1024 <= small.micro_tokens < 8 * 1024, (small.checkpointing, small.micro_tokens)
    t = plan_for(tmp_path, h200(free=8.0), backend='transformers')
    assert t.backend == 'transformers' and t.checkpointing is True and t.load_in_4bit
    assert plan_for(tmp_path, h200(), auto_fp16_bf16=False).dtype == 'float32'
    assert plan_for(tmp_path, h200(bf16=False)).dtype == 'float16'
    msg = problems_of(lambda: plan_for(tmp_path, h200(unsloth=False, bitsandbytes=False)))
    assert "[Quantization] LOAD_IN_4BIT = true needs bitsandbytes on the transformers backend" in msg
    assert plan_for(tmp_path, h200(unsloth=False, bitsandbytes=False), load_in_4bit=False).backend == 'transformers'


def test_plan_shares_a_step_between_processes(tmp_path):
    "Several processes share each step: auto deals its B x G rows (each process needs one); off, group and on deal G micro-batches."
    p = plan_for(tmp_path, h200(), processes=2)
    assert (p.processes, p.rows_per_step, p.accumulation) == (2, 8, None)
    assert plan_for(tmp_path, h200(), processes=8).rows_per_step == 8
    msg = problems_of(lambda: plan_for(tmp_path, h200(), processes=9))
    assert ("[Training] PER_DEVICE_TRAIN_BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS = 8 rows a step cannot be shared by 9 processes (GPUs): "
            "raise GRADIENT_ACCUMULATION_STEPS to 5 or more.") in msg
    assert plan_for(tmp_path, h200(), processes=2, packing='off').accumulation == 2
    for mode in ('off', 'group', 'on'):
        msg = problems_of(lambda: plan_for(tmp_path, h200(), processes=3, packing=mode))
        assert "[Training] GRADIENT_ACCUMULATION_STEPS = 4 cannot be shared by 3 processes (GPUs)" in msg and "e.g. 3 or 6." in msg


def test_disk_need():
    from taide_ft.environment import disk_need
    need = disk_need(8e9, ['q4_k_m', 'q8_0'])
    assert need == {'f16': 16_000_000_000, 'q4_k_m': 4_890_000_000, 'q8_0': 8_500_000_000, 'checkpoints': 2**30,
                    'total': 16_000_000_000 + 4_890_000_000 + 8_500_000_000 + 2**30}
    assert disk_need(8e9, ['bf16'], merged_copy=True) == {'bf16': 16_000_000_000, 'checkpoints': 2**30, 'merged': 16_000_000_000,
                                                         'total': 32_000_000_000 + 2**30}


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


def cli(*args, cwd=ROOT, **env):
    return subprocess.run([sys.executable, '-m', 'taide_ft', *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


def test_cli_check_offline_says_how_to_get_the_model(tmp_path):
    "The shipped config without the hub and without the model in the cache: an ERROR with the download command, exit 1."
    r = cli('check', '--config', 'config.ini', HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path/'hf'))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert ("ERROR: [Model] BASE_MODEL_NAME = taide/Llama-3.1-TAIDE-LX-8B-Chat: cannot reach the hub and the model is not cached. "
            "Download it where there is network (`hf download taide/Llama-3.1-TAIDE-LX-8B-Chat --local-dir <folder>`") in r.stdout, out
    assert 'OK: the run can start.' not in out and 'Traceback' not in out
    assert 'Steps: 60 steps x 8 rows = ' in r.stdout  # the rest still checked: data, steps, plan
    assert re.search(r'^a step +8 rows; micro-batches sorted, as few as fit, padded', r.stdout, re.M), r.stdout


def test_cli_check_passes_with_a_local_model(tmp_path):
    "A local model folder: the plan, the data and the steps, then OK (exit 0); too few or too many steps only warn."
    from taide_ft.fixtures import tiny_llama
    tiny_llama(tmp_path/'tiny')
    (tmp_path/'train_data.jsonl').write_text(''.join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(20)), encoding='utf-8')
    ini = write(tmp_path, "[Model]\nBASE_MODEL_NAME = tiny\nMAX_SEQ_LENGTH = 256\n[Training]\nMAX_STEPS = 10\n", data=False)
    r = cli('check', '--config', str(ini))
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'OK: the run can start.' in r.stdout and 'ERROR' not in r.stdout and 'Traceback' not in r.stderr
    assert re.search(rf"^base model +{re.escape(str(tmp_path/'tiny'))} \(folder, 0\.\d\d B parameters\)$", r.stdout, re.M), r.stdout
    assert re.search(r'^a step +8 rows; micro-batches sorted, as few as fit, padded, up to 512 tokens each$', r.stdout, re.M), r.stdout
    assert 'data ok: 20 rows (jsonl, instruction)' in r.stdout and 'Data: format jsonl, shape instruction, rows 20,' in r.stdout, r.stdout
    assert 'Steps: 10 steps x 8 rows = 3.33 epochs of 20 rows\n' in r.stdout and 'WARNING: 10 steps' not in r.stdout
    r = cli('check', '--config', str(ini), '--set', 'Training.MAX_STEPS=1', '--set', 'Training.WARMUP_STEPS=0')
    assert r.returncode == 0 and re.search(r'^Steps: 1 steps x 8 rows = .*0\.33 epochs of 20 rows \(\d+ rows never seen\)$', r.stdout, re.M), r.stdout
    assert 'less than one pass over the data. Raise MAX_STEPS to 3 (one epoch), or set NUM_EPOCHS = 1.' in r.stdout
    r = cli('check', '--config', str(ini), '--set', 'Training.NUM_EPOCHS=2')
    assert r.returncode == 0 and 'Steps: 6 steps x 8 rows = 2.00 epochs of 20 rows\n' in r.stdout, r.stdout
    r = cli('check', '--config', str(ini), '--set', 'Training.MAX_STEPS=100')
    assert r.returncode == 0 and '33 passes over 20 rows usually overfit' in r.stdout and 'Lower MAX_STEPS to about 9 (3 epochs)' in r.stdout, r.stdout


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
