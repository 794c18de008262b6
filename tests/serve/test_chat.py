"""Chat templates: the model folder's Jinja template when it has one (rendered in a sandbox), else the documented
default; a template that fails is a ValueError (the server's 400), and one that reaches for Python is refused."""

import json

import pytest

from blackmamba.serve.chat import DEFAULT_STOP, ChatTemplate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def test_default_template_and_its_stop():
    t = ChatTemplate.for_folder(None)
    assert t.render(MESSAGES) == "System: Be brief.\n\nUser: Hello\n\nAssistant:"
    assert t.stop == DEFAULT_STOP == ("\n\nUser:",)


def test_the_folders_template_is_used(tmp_path):
    source = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": source, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    t = ChatTemplate.for_folder(tmp_path)
    assert t.render(MESSAGES) == "<s><|system|>Be brief.</s><|user|>Hello</s><|assistant|>"
    assert t.stop == ()  # the model's own template: no implied stop strings


def test_failing_and_unsafe_templates_are_value_errors(tmp_path):
    refusing = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}"
                "{% endif %}")
    with pytest.raises(ValueError, match="first message must be the user"):
        ChatTemplate(refusing).render(MESSAGES)
    with pytest.raises(ValueError, match="chat template failed"):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(MESSAGES)
    with pytest.raises(ValueError, match="chat template failed"):  # the template's own error, not jinja's
        ChatTemplate("{{ 'a' + 1 }}").render(MESSAGES)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        ChatTemplate.for_folder(tmp_path)
