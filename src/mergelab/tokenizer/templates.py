"""Chat templates a recipe can name (`chat_template: chatml`), as MergeKit's built-in set names them.

Written for mergelab from each format's published layout; a recipe may also
give a literal Jinja template, or `auto` (the template most of the models share).
"""

from __future__ import annotations



def _gen(prompt: str) -> str:
    """The tail that opens the assistant's turn when add_generation_prompt is set."""
    return "{% if add_generation_prompt %}{{ '" + prompt + "' }}{% endif %}"


TEMPLATES = {
    # <|im_start|>role\ncontent<|im_end|>\n per message (OpenAI's ChatML).
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
              " + '<|im_end|>\\n' }}{% endfor %}" + _gen("<|im_start|>assistant\\n"),
    # Llama 3: header ids around the role, a blank line, the trimmed content, <|eot_id|>.
    "llama3": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role']"
              " + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
              + _gen("<|start_header_id|>assistant<|end_header_id|>\\n\\n"),
    # Alpaca: a system preamble, then ### Instruction: / ### Response: blocks.
    "alpaca": "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
              "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
              "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token"
              " + '\\n\\n' }}{% endif %}{% endfor %}" + _gen("### Response:\\n"),
    # Mistral instruct: [INST] user [/INST] answer</s>; a system message goes before the first user turn.
    "mistral": "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
               "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
               "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
               "{% set ns.system = '' %}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
               "{% endif %}{% endfor %}",
    # EXAONE: [|role|]content, turns of system and assistant closed by [|endofturn|].
    "exaone": "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[|user|]' + message['content']"
              " + '\\n' }}{% else %}{{ '[|' + message['role'] + '|]' + message['content'] + '[|endofturn|]\\n' }}"
              "{% endif %}{% endfor %}" + _gen("[|assistant|]"),
}


def is_template_name(text: str) -> bool:
    """MergeKit's test: a short single line without `{` is a template's name, not a template."""
    return len(text) < 256 and "\n" not in text and "{" not in text
