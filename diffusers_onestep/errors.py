"""How a library's error is quoted inside one of our one-sentence messages.

``huggingface_hub``, ``datasets``, diffusers, PIL and safetensors errors often hold several sentences, request ids
and hints over several lines; a refusal quotes only the first sentence of the first line, in parentheses, so that the
message stays one sentence that ends where ours does.
"""

import re


#: a full stop that ends a sentence: followed by white space and a capital letter
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])")


def reason_of(error: BaseException) -> str:
    """The first sentence of the first line of ``error``'s message (its type's name if it has none), without its
    closing full stop."""
    text = str(error).strip() or type(error).__name__
    first = _SENTENCE_END.split(text.splitlines()[0], maxsplit=1)[0]
    return first.strip().rstrip(".") or type(error).__name__
