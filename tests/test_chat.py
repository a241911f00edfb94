"""memlab.models.chat: chat templates rendered as Hugging Face renders them."""
import pytest

from memlab.models import chat, gguf_io


@pytest.fixture(scope="module")
def smollm2_template():
    import memlab.models as models

    return gguf_io.chat_template(gguf_io.open_reader(models.weights_path("smollm2-135m")))


SMOL_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face<|im_end|>\n")


def test_smollm2_template_two_messages(smollm2_template):
    # read from the template: a default system turn when the first message is not a
    # system one, each message as <|im_start|>{role}\n{content}<|im_end|>\n, then the
    # assistant header when a generation prompt is asked for
    msgs = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4, of course."}]
    body = ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4, of course.<|im_end|>\n")
    assert chat.render(smollm2_template, msgs) == SMOL_SYSTEM + body + "<|im_start|>assistant\n"
    assert chat.render(smollm2_template, msgs, add_generation_prompt=False) == SMOL_SYSTEM + body


def test_smollm2_template_own_system_message(smollm2_template):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Héllo 🙂"}]
    assert chat.render(smollm2_template, msgs) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHéllo 🙂<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_smollm2_rendered_prompt_tokenizes_to_its_special_tokens(smollm2_template):
    import memlab.models as models

    reader = gguf_io.open_reader(models.weights_path("smollm2-135m"))
    tok = gguf_io.read_tokenizer(reader)
    text = chat.render(smollm2_template, [{"role": "user", "content": "Hi"}])
    ids = tok.encode(text, add_special_tokens=False).ids
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    tail = tok.encode("assistant\n", add_special_tokens=False).ids
    assert ids.count(start) == 3 and ids.count(end) == 2
    assert ids[-len(tail) - 1:] == [start] + tail  # the prompt ends on the assistant header


def test_hf_whitespace_control_and_loop_controls():
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it
    tpl = ("{% for m in messages %}\n"
           "    {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
           "    {% if loop.index > 3 %}{% break %}{% endif %}\n"
           "[{{ m['role'] }}:{{ m['content'] }}]\n"
           "{% endfor %}\n"
           "{% if add_generation_prompt %}{{ bos_token }}>{% endif %}")
    msgs = [{"role": r, "content": c} for r, c in
            [("user", "a"), ("skip", "b"), ("bot", "c"), ("user", "d"), ("bot", "e")]]
    assert chat.render(tpl, msgs, bos_token="<s>") == "[user:a]\n[bot:c]\n<s>>"
    assert chat.render(tpl, msgs, add_generation_prompt=False) == "[user:a]\n[bot:c]\n"


def test_extra_variables_and_tojson():
    tpl = "{{ tools | tojson }}|{{ eos_token }}|{{ date_string }}"
    out = chat.render(tpl, [], tools=[{"name": "météo"}], eos_token="</s>", date_string="d")
    assert out == '[{"name": "météo"}]|</s>|d'


def test_raise_exception_names_the_source():
    tpl = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
           "{% endif %}{{ m['content'] }}{% endfor %}")
    ok = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert chat.render(tpl, ok) == "xy"
    with pytest.raises(chat.ChatTemplateError,
                       match=r"my-model template rejected the conversation: Conversation roles"):
        chat.render(tpl, ok[::-1], source="my-model template")


def test_syntax_error_names_the_source():
    with pytest.raises(chat.ChatTemplateError, match=r"gguf:x does not compile: .*line 1"):
        chat.render("{% for m in messages %}{{ m }}", [], source="gguf:x")


def test_render_error_names_the_source():
    with pytest.raises(chat.ChatTemplateError, match=r"t1 failed to render: .*"):
        chat.render("{{ messages[0]['content'] + 1 }}", [{"role": "u", "content": "a"}],
                    source="t1")


def test_sandbox_blocks_internals_and_mutation():
    with pytest.raises(chat.ChatTemplateError, match="failed to render: SecurityError"):
        chat.render("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(chat.ChatTemplateError, match="failed to render: SecurityError"):
        chat.render("{{ messages.append(1) }}", [])


@pytest.mark.parametrize("bad, match", [
    ("hello", "messages must be a list"),
    ({"role": "user", "content": "x"}, "messages must be a list"),
    ([("user", "x")], r"messages\[0\] must be a dict"),
    ([{"role": "user"}], r"messages\[0\] lacks \['content'\]"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] lacks \['role'\]"),
    ([{"role": 3, "content": "x"}], r"messages\[0\]\['role'\] must be a non-empty string"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a string"),
])
def test_malformed_messages(bad, match):
    with pytest.raises(ValueError, match=match):
        chat.render("{{ messages }}", bad)


def test_missing_template_is_a_clear_error():
    with pytest.raises(ValueError, match="base models ship none"):
        chat.render(None, [{"role": "user", "content": "x"}], source="gemma3-270m")


def test_generate_with_messages_applies_the_models_template(smollm2):
    """generate(messages=...) renders SmolLM2-Instruct's own template (from its GGUF),
    tokenizes it without adding special tokens again, and answers."""
    from memlab.generate import chat_prompt, generate
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = chat_prompt(smollm2, msgs)
    assert text.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in text
    ids = smollm2.tokenizer.encode(text, add_special_tokens=False).ids
    assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == text
    answer = generate(smollm2, messages=msgs, max_new_tokens=12)
    assert "Paris" in answer
    with pytest.raises(ValueError, match="not both"):
        generate(smollm2, "hi", messages=msgs)
    bare = smollm2.with_extras(chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        generate(bare, messages=msgs)
