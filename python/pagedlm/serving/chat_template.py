"""Chat prompts: the model folder's chat template (tokenizer_config.json's `chat_template`, or
a chat_template.jinja file beside it) rendered with Jinja2 as transformers renders it (a
sandbox, trim_blocks and lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, the
tokenizer's special tokens as variables), else DEFAULT_CHAT_TEMPLATE:

    <role>: <content>        one line per message (content as written, newlines kept)
    assistant:               the generation prompt

The rendered text is tokenized without adding special tokens (a template writes its own).
"""
import json
from datetime import datetime
from pathlib import Path

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render."""


def _token_text(value):
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        return value.get("content")
    return value


def load_chat_template(folder, override=None):
    """(template source, special-token variables) for a model folder. override: a template
    string or the path of a file holding one."""
    folder = Path(folder) if folder is not None else None
    config = {}
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text())
    variables = {name: _token_text(config.get(name)) for name in
                 ("bos_token", "eos_token", "unk_token", "pad_token")}
    variables = {k: v for k, v in variables.items() if v is not None}
    if override is not None:
        path = Path(override)
        return (path.read_text() if path.is_file() else override), variables
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates, as transformers stores several
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and folder is not None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return template or DEFAULT_CHAT_TEMPLATE, variables


class ChatTemplate:
    def __init__(self, source, variables=None):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatTemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template_error = TemplateError
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
        self.source = source
        self.variables = dict(variables or {})

    def render(self, messages, add_generation_prompt=True):
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except ChatTemplateError:
            raise
        except (self._template_error, TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
