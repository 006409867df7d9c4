"""The rule-based teacher: writes each bridging step from a synthetic scene's ground truth.

No real multimodal or reasoning model runs on a laptop CPU, so the local demo bridges
the synthetic task family (``data.synthetic``) with this backend. It reads the row's
``scene`` (carried by the bridging source rows the generator writes) and produces what
the real models would: a pseudo-CoT, an image description, and a reasoning trace with
self-checks that ends in ``Final Answer:``. It cannot bridge any other data, and the
data set's statistics say so.
"""

from __future__ import annotations

import json
from typing import Sequence

from ...data import synthetic
from . import Completion, Generator, Progress, Request, register

TEACHER = "rule-based (synthetic tasks only)"


class RuleTeacher(Generator):
    kind = "rule"

    def generate(self, requests: Sequence[Request], progress: Progress = None) -> list[Completion]:
        out = [self._one(r) for r in requests]
        if progress:
            progress(len(requests))
        return out

    def _one(self, request: Request) -> Completion:
        scene = request.meta.get("scene")
        if isinstance(scene, str):
            try:
                scene = json.loads(scene)
            except json.JSONDecodeError:
                scene = None
        if not isinstance(scene, dict) or scene.get("task") not in synthetic.MAKERS:
            return Completion(None, error="rule_no_scene")
        if request.step == "pseudo_cot":
            return Completion(synthetic.teacher_pseudo_cot(scene, synthetic.teacher_reasoning(scene)[1]))
        if request.step == "description":
            return Completion(synthetic.teacher_description(scene))
        reasoning, answer = synthetic.teacher_reasoning(scene)
        # The shape of a DeepSeek-R1 answer, so the same parser reads it.
        return Completion(f"<think>\n{reasoning}\n</think>\n\nFinal Answer: {answer}")

    def describe(self) -> dict:
        return {"backend": "rule", "teacher": TEACHER}


@register("rule")
def _make(spec, ctx) -> RuleTeacher:
    return RuleTeacher()
