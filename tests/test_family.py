"""The TAIDE families beyond Llama 3.1, on CPU: Gemma 3 (the Gemma 3 270M GGUF from PyPI, with Gemma 3's chat template)
fine-tuned, evaluated and exported end to end from `BASE_MODEL_NAME = <the .gguf>`; the family line and the unsupported-
architecture error of `taide-ft check` and `run`; and Llama 2's `[INST] <<SYS>>` chat template through the Ollama template."""
import json, os, re, subprocess, sys, time
from pathlib import Path
import pytest
from taide_ft.config import load_config
from taide_ft.fixtures import gemma3_gguf, llama3_tokenizer_dir, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = '你是一個來自台灣的AI助理，會用繁體中文回答問題。'
ROWS = [{'instruction': q, 'output': a} for q, a in [
    ('台灣最高的山是哪一座？', '玉山。'), ('台北101有幾層樓？', '101層。'), ('日月潭在哪個縣？', '南投縣。'),
    ('台灣的首都是哪裡？', '台北。'), ('阿里山在哪個縣？', '嘉義縣。'), ('淡水河流經哪個城市？', '台北。'),
    ('墾丁在哪個縣？', '屏東縣。'), ('太魯閣在哪個縣？', '花蓮縣。'), ('台灣最長的河是哪一條？', '濁水溪。'),
    ('故宮博物院在哪個城市？', '台北。'), ('赤崁樓在哪個城市？', '台南。'), ('愛河在哪個城市？', '高雄。')]]


def _env():
    return {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}


# ------------------------------------------------------------------------------------------------------------- Gemma 3

@pytest.fixture(scope='module')
def gemma_run(tmp_path_factory):
    from taide_ft.pipeline import fine_tune
    d = tmp_path_factory.mktemp('gemma3')
    write_jsonl(d/'train.jsonl', ROWS)
    cfg = load_config(None, base_model_name=str(gemma3_gguf()), new_model_name='test/gemma3-taide', output_dir=str(d/'run'),
                      dataset_file=str(d/'train.jsonl'), system_prompt=SYSTEM, max_seq_length=128, max_steps=16, warmup_steps=2,
                      learning_rate=2e-3, per_device_train_batch_size=3, gradient_accumulation_steps=1, save_steps=0,
                      eval_split=0.25, quantization_method='f16,q8_0')
    t0 = time.perf_counter(); run = fine_tune(cfg); dt = time.perf_counter() - t0
    print(f"\nGemma 3 270M fine-tune + export: {dt:.0f} s")
    return cfg, run


@pytest.mark.slow  # the five share one run: about 2 to 5 minutes on 2 cores, dequantizing included; in the default run
def test_gemma3_trains_and_evaluates(gemma_run):
    cfg, run = gemma_run
    assert run.plan.backend == 'transformers' and run.plan.dtype == 'float32'
    log = (cfg.output_dir/'finetune.log').read_text(encoding='utf-8')
    assert re.search(r'^family +Gemma 3 \(Gemma3ForCausalLM\), chat template: Gemma turns \(<start_of_turn>\), context 32,768 tokens$', log, re.M)
    assert run.train.steps == 16 and run.train.eval_loss < run.train.first_eval_loss, run.train
    assert run.evaluation is not None and (cfg.output_dir/'eval.md').is_file()


@pytest.mark.slow
def test_gemma3_export_verified(gemma_run):
    from taide_ft.export import read_gguf
    cfg, run = gemma_run
    rep = run.export.report
    assert rep['f16']['passed'] and rep['q8_0']['passed'], rep
    assert rep['f16']['greedy'].count('match') >= len(rep['f16']['greedy']) - 1 and rep['f16']['first_logits_max_abs_diff'] < 0.1, rep['f16']
    for p in run.export.ggufs.values():
        m = read_gguf(p)
        # the base GGUF's SentencePiece vocabulary, BOS added by the GGUF, and Gemma's end of turn as llama.cpp's end-of-turn token
        assert (m['architecture'], m['tokenizer'], m['bos'], m['eos'], m['add_bos'], m['n_vocab']) == ('gemma3', 'llama', 2, 1, True, 262144), m
        assert '<start_of_turn>' in m['chat_template']
    assert rep['f16']['tokens']['eot'] == 106  # <end_of_turn>


@pytest.mark.slow
def test_gemma3_modelfile_folds_the_system_prompt(gemma_run):
    "Gemma 3 has no system role: the TEMPLATE puts SYSTEM_PROMPT at the head of the first user turn, as the chat template does."
    from transformers import AutoTokenizer
    import llama_cpp
    from taide_ft.export import _modelfile_template
    from taide_ft.ollama import render_go
    cfg, run = gemma_run
    mf = run.export.modelfile.read_text(encoding='utf-8')
    assert 'PARAMETER stop "<end_of_turn>"' in mf and 'PARAMETER stop "<start_of_turn>"' in mf and f'SYSTEM """{SYSTEM}"""' in mf
    tpl = _modelfile_template(run.export.modelfile)
    assert '{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}' in tpl and '<bos>' not in tpl
    tok = AutoTokenizer.from_pretrained(cfg.output_dir/'adapter')
    llm = llama_cpp.Llama(str(run.export.ggufs['q8_0']), vocab_only=True, verbose=False)
    chat = [{'role': 'user', 'content': '台北101有幾層樓？'}, {'role': 'assistant', 'content': '101層。'}, {'role': 'user', 'content': '玉山呢？'}]
    want = tok(tok.apply_chat_template([{'role': 'system', 'content': SYSTEM}] + chat, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False).input_ids
    assert llm.tokenize(render_go(tpl, SYSTEM, chat).encode(), add_bos=True, special=True) == want


@pytest.mark.slow
def test_gemma3_gguf_answers_and_stops(gemma_run):
    from taide_ft.export import GGUFChat
    cfg, run = gemma_run
    bot = GGUFChat(run.export.ggufs['q8_0'], n_ctx=256)
    answer, n, stopped = bot([{'role': 'system', 'content': SYSTEM}, {'role': 'user', 'content': ROWS[0]['instruction']}], max_tokens=32)
    assert stopped and 0 < n < 32 and answer, (answer, n, stopped)


@pytest.mark.slow
def test_gemma3_q4_k_m_from_its_q4_k_m_gguf_fails_and_says_why(gemma_run, tmp_path):
    "The base GGUF is q4_k_m: a q4_k_m export rounds the fine-tune back onto the base's grid. check warns, and the export's check fails, saying why."
    from taide_ft.environment import env_report
    from taide_ft.export import ExportError, export_gguf
    cfg, run = gemma_run
    # the check reads answers from DATASET_FILE: the demo data's 512 tokens give a steady figure (0.52 measured), ROWS' 63 a rough one
    q4 = load_config(None, base_model_name=cfg.model.base_model_name, new_model_name='test/gemma3-taide', output_dir=str(tmp_path/'q4'),
                     dataset_file=str(ROOT/'demo'/'train_data.jsonl'), system_prompt=SYSTEM, max_seq_length=128, quantization_method='q4_k_m')
    why = "is itself a q4_k_m GGUF: its weights already sit on q4_k_m's grid"
    assert [w for w in env_report(q4, base=run.plan.base).warnings if why in w], env_report(q4, base=run.plan.base).warnings
    with pytest.raises(ExportError) as e: export_gguf(q4, adapter_dir=cfg.output_dir/'adapter', base=run.plan.base)
    msg = str(e.value)
    assert '`gemma3-taide-q4_k_m.unverified.gguf` failed verification: teacher-forced top-1 agreement' in msg and why in msg, msg
    assert 'Export a finer type ([Quantization] QUANTIZATION_METHOD = q8_0 or q6_k)' in msg, msg
    rep = json.loads((tmp_path/'q4'/'export_report.json').read_text())['results']['q4_k_m']
    assert not rep['passed'] and rep['top1_tokens'] == 512 and rep['top1_agreement'] < rep['top1_floor'] - 0.1, rep
    assert (tmp_path/'q4'/'gemma3-taide-q4_k_m.unverified.gguf').is_file() and not (tmp_path/'q4'/'gemma3-taide-q4_k_m.gguf').exists()


@pytest.mark.slow
def test_dequantized_gemma3_matches_its_gguf(gemma_run):
    "The folder transformers dequantized (norms shifted back, embeddings tied) predicts as the GGUF does in llama.cpp."
    from taide_ft.environment import base_folder, resolve_base
    from taide_ft.export import verify_gguf
    g = gemma3_gguf()
    folder = base_folder(resolve_base(str(g)))
    assert (folder/'tokenizer.model').is_file() and json.loads((folder/'config.json').read_text())['architectures'] == ['Gemma3ForCausalLM']
    prompts = [[{'role': 'user', 'content': q}] for q in ('Write one sentence about Taipei.', '台灣最高的山是哪一座？')]
    rep = verify_gguf(g, folder, prompts, qtype='q4_k_m', max_new_tokens=12)
    assert rep['passed'] and rep['top1_agreement'] >= 0.6, rep


# ------------------------------------------------------------------------------------------------------------- taide-ft check / run

def _cli(*args, cwd):
    return subprocess.run([sys.executable, '-m', 'taide_ft', *args], capture_output=True, text=True, cwd=cwd, env=_env(), timeout=600)


def _opt_folder(d):
    "A real architecture transformers trains but llama.cpp's converter cannot write (OPT), with no chat template."
    from transformers import OPTConfig
    d.mkdir(parents=True, exist_ok=True)
    OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, vocab_size=100, word_embed_proj_dim=16).save_pretrained(d)
    return d


def test_check_names_the_family(tmp_path):
    from taide_ft.fixtures import tiny_llama
    tiny_llama(tmp_path/'tiny')
    write_jsonl(tmp_path/'train_data.jsonl', ROWS)
    (tmp_path/'config.ini').write_text("[Model]\nBASE_MODEL_NAME = tiny\nMAX_SEQ_LENGTH = 256\n", encoding='utf-8')
    r = _cli('check', '--config', 'config.ini', cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r'^family +Llama 3\.1 \(LlamaForCausalLM\), chat template: Llama 3 headers \(<\|start_header_id\|>\), context 131,072 tokens$',
                     r.stdout, re.M), r.stdout


def test_unsupported_architecture_fails_check_and_run(tmp_path):
    _opt_folder(tmp_path/'opt')
    write_jsonl(tmp_path/'train_data.jsonl', ROWS)
    (tmp_path/'config.ini').write_text("[Model]\nBASE_MODEL_NAME = opt\nMAX_SEQ_LENGTH = 256\n", encoding='utf-8')
    want = "opt: architecture `OPTForCausalLM` (model type opt) cannot be fine-tuned and exported here: it needs llama.cpp's GGUF converter"
    r = _cli('check', '--config', 'config.ini', cwd=tmp_path)
    assert r.returncode == 1 and want in r.stdout and 'a chat template in its tokenizer' in r.stdout, r.stdout[-3000:]
    r = _cli('run', '--config', 'config.ini', cwd=tmp_path)
    assert r.returncode == 1 and 'ModelError: [Model] BASE_MODEL_NAME = ' in r.stdout and want in r.stdout and 'Traceback' not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-2000:]
    assert not (tmp_path/'outputs'/'adapter').exists()


# ------------------------------------------------------------------------------------------------------------- Llama 2

# Meta's Llama 2 chat format as its tokenizer_config.json writes it (the system prompt folded into the first user turn
# between <<SYS>> markers, each exchange `<s>[INST] ... [/INST] answer </s>`); TAIDE-LX-7B-Chat uses this format.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture
def llama2_tok(tmp_path):
    "The Llama 3 tokenizer (offline) with Llama 2's chat template and Llama 2's <s>/</s> roles played by its BOS and EOS."
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir(tmp_path/'tok', LLAMA2_CHAT_TEMPLATE))


@pytest.mark.parametrize('system', ['', SYSTEM])
def test_llama2_template(llama2_tok, system):
    from taide_ft.ollama import derive_template, render_go
    tok = llama2_tok
    # the template writes BOS at every turn: a GGUF that adds one itself would double it, and the derivation says so
    with pytest.raises(ValueError, match='writes BOS .* at every user turn'): derive_template(tok, system, add_bos=True)
    tpl, stops, info = derive_template(tok, system, add_bos=False)  # raises unless Ollama's ids equal training's (check_template)
    assert info['system'] == 'folded' and (info['sys_pre'], info['fold']) == ('<<SYS>>\n', '\n<</SYS>>\n\n')
    assert stops == [tok.eos_token, tok.bos_token]  # the end of an answer, then the next turn's BOS
    chat = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': '台北在哪裡？'}]
    got = render_go(tpl, system, chat)
    want = tok.apply_chat_template(([{'role': 'system', 'content': system}] if system else []) + chat, tokenize=False, add_generation_prompt=True)
    assert got == want
    assert want.count('<<SYS>>') == (1 if system else 0) and want.count(tok.bos_token + '[INST] ') == 2


def test_llama2_family(tmp_path, llama2_tok):
    from taide_ft.environment import check_family, resolve_base
    d = tmp_path/'llama2'
    d.mkdir()
    (d/'config.json').write_text(json.dumps(dict(architectures=['LlamaForCausalLM'], model_type='llama', hidden_size=4096, num_hidden_layers=32,
                                                 vocab_size=32000, intermediate_size=11008, num_attention_heads=32, max_position_embeddings=4096)))
    llama2_tok.save_pretrained(d)
    assert str(check_family(resolve_base(str(d)))) == 'Llama 2 (LlamaForCausalLM), chat template: Llama 2 [INST] <<SYS>>, context 4,096 tokens'


# ------------------------------------------------------------------------------------------------------------- Llama 3.1, Meta's template

def test_llama31_with_metas_own_template_end_to_end(tmp_path):
    """Meta's Llama 3.1 chat template as TRL ships it (a system block with date lines on every chat, tool branches) on a tiny
    random Llama with the real Llama 3 tokenizer: trained with the answers labelled, exported, and the Modelfile's TEMPLATE
    checked token for token at the export, with the template's static date lines kept."""
    import importlib.util
    from transformers import AutoTokenizer
    from taide_ft.dataset import labelled_text, tokenize_row
    from taide_ft.export import _modelfile_template
    from taide_ft.fixtures import tiny_llama
    from taide_ft.pipeline import fine_tune
    base = tiny_llama(tmp_path/'base', hidden_size=64)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = (Path(importlib.util.find_spec('trl').submodule_search_locations[0])/'chat_templates'/'llama3_1.jinja').read_text(encoding='utf-8')
    tok.save_pretrained(base)
    write_jsonl(tmp_path/'train.jsonl', ROWS)
    cfg = load_config(None, base_model_name=str(base), new_model_name='test/taide-meta', output_dir=str(tmp_path/'run'),
                      dataset_file=str(tmp_path/'train.jsonl'), system_prompt=SYSTEM, max_seq_length=256, max_steps=4, warmup_steps=1,
                      per_device_train_batch_size=2, gradient_accumulation_steps=1, save_steps=0, eval='false', quantization_method='f16')
    run = fine_tune(cfg)
    assert run.train.steps == 4 and run.export.report['f16']['passed'], run.export.report
    tpl = _modelfile_template(run.export.modelfile)
    assert 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' in tpl and '<|begin_of_text|>' not in tpl, tpl
    # what training saw: the date lines in the system block, and only the answer (with its <|eot_id|>) labelled
    tok = AutoTokenizer.from_pretrained(cfg.output_dir/'adapter')
    chat = [{'role': 'system', 'content': SYSTEM}, {'role': 'user', 'content': ROWS[0]['instruction']}, {'role': 'assistant', 'content': ROWS[0]['output']}]
    text = labelled_text(tokenize_row(chat, tok), tok)
    assert 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' + SYSTEM in text, text
    assert re.findall('⟦(.*?)⟧', text, re.S) == [ROWS[0]['output'] + '<|eot_id|>'], text
