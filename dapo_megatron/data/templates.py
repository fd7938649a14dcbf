"""Prompt templates: the DAPO math instruction around a question, and the tokenizer's chat template."""
from typing import Optional

DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{question}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
TEMPLATES = {"dapo": DAPO_TEMPLATE, "none": "{question}"}


def format_question(question: str, template: str = "dapo") -> str:
    """`template`: `dapo`, `none`, or a custom format string with a `{question}` field."""
    fmt = TEMPLATES.get(template, template)
    if "{question}" not in fmt:
        raise ValueError(f"data.template={template!r} is neither 'dapo', 'none' nor a format string with "
                         "a {question} field")
    return fmt.replace("{question}", question)  # not str.format: questions and templates contain braces


def render_messages(tokenizer, messages: list[dict], apply_chat_template: bool = True,
                    tools: Optional[list] = None) -> tuple[str, bool]:
    """The prompt text the model sees, and whether it came from the chat template (which already
    carries its special tokens). Without a chat template, the turns' contents joined by blank lines.
    `tools`: function schemas the chat template lists in the prompt (multi-turn tool calling)."""
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        kw = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
        return text, True
    return "\n\n".join(m["content"] for m in messages), False
