"""The prompts of the three Modality Bridging steps (Vision-R1, Sec. 3.1 and Fig. 3).

1. The MLLM sees the image, the question and the answer, and writes a "pseudo-CoT":
   what it sees and how that leads to the answer. Asking for the reasoning with the
   answer given makes the model surface the visual details the answer depends on.
2. The MLLM sees the image, the question and its pseudo-CoT, and writes a detailed
   description of the image that holds every detail needed to answer, without solving
   the problem. This is the bridge: the image turned into text.
3. The text-only reasoning model (DeepSeek-R1 class) sees only the description and the
   question and reasons to the answer; its long CoT (with self-reflection) becomes the
   cold-start target, paired with the real image.

The wording follows the paper's description of each step; the exact prompt text of
the authors' pipeline is not published in a form we could copy. Each template can be
replaced through ``spec.stages.bridge.prompts``. Placeholders are substituted literally
(not with ``str.format``), so templates may contain LaTeX braces.
"""

from __future__ import annotations

import re

PSEUDO_COT = (
    "Given the image, a question about it and the question's correct answer, explain step "
    "by step how the answer follows from the image. First describe what the image shows "
    "that matters for the question (objects, numbers, labels, lengths, angles, positions, "
    "colors), then reason from those details to the answer.\n\n"
    "Question: {question}\n\nCorrect answer: {answer}"
)

DESCRIPTION = (
    "Below are a question about the image and a reasoning process for it. Write a detailed "
    "description of the image that contains every visual detail needed to answer the "
    "question, so that someone who cannot see the image could solve the problem from your "
    "description alone. Describe the image only: do not solve the problem and do not state "
    "the answer.\n\nQuestion: {question}\n\nReasoning process: {pseudo_cot}"
)

REASONING = (
    "The following is a detailed description of an image, followed by a question about "
    "the image.\n\nImage description: {description}\n\nQuestion: {question}\n\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)

# A text-only row has no image to bridge: the reasoning model gets the question alone,
# in DeepSeek-R1's recommended form for math problems.
TEXT_ONLY_REASONING = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{}."

DEFAULTS = {"pseudo_cot": PSEUDO_COT, "description": DESCRIPTION, "reasoning": REASONING}
# The placeholders each step's template must use; the step cannot work without them.
REQUIRED = {
    "pseudo_cot": ("question", "answer"),
    "description": ("question", "pseudo_cot"),
    "reasoning": ("description", "question"),
}
_PLACEHOLDER = re.compile(r"\{(question|answer|pseudo_cot|description)\}")


def templates(overrides) -> dict[str, str]:
    """The three templates: the paper's defaults with ``BridgePrompts`` overrides applied."""
    out = {}
    for step, default in DEFAULTS.items():
        custom = getattr(overrides, step, None) if overrides is not None else None
        template = custom if custom else default
        missing = [name for name in REQUIRED[step] if "{" + name + "}" not in template]
        if missing:
            field = "pseudoCot" if step == "pseudo_cot" else step
            raise ValueError(f"bridge.prompts.{field}: the template must contain "
                             + ", ".join("{" + m + "}" for m in missing))
        out[step] = template
    return out


def render(template: str, **fields: str) -> str:
    """Substitute ``{question}``-style placeholders literally; other braces are left alone."""
    return _PLACEHOLDER.sub(lambda m: fields.get(m.group(1), m.group(0)), template)
