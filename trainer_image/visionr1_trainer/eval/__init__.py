"""The eval stage: MathVista, MathVerse, MM-Math, DynaMath and synthetic-task scoring.

    benchmarks.py   rows of each benchmark's public schema -> ``EvalItem``s (with categories)
    extract.py      ``extract_answer(completion, choices=None)``: the answer in a completion
    scoring.py      rule-based verdicts (math-verify for free-form math) and unit summaries
    judge.py        the optional OpenAI-compatible LLM judge
    sampling.py     ``hf`` and ``vllm`` sampling, with retries of answers lacking ``</answer>``
    stage.py        the resumable stage: units, artifacts, metrics, the compact summary
"""


def run(config):
    """Entry point of ``python -m visionr1_trainer eval`` (imported lazily: torch is heavy)."""
    from .stage import run as run_stage

    return run_stage(config)
