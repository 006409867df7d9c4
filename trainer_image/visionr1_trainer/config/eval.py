"""The eval stage's settings: benchmarks, judge, sampling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..schema import (
    DNS_LABEL,
    HttpUrlNoCredentials,
    Schema,
)
from .sources import DatasetRef, SecretKeyRef


class JudgeSpec(Schema):
    """An LLM judge behind any OpenAI-compatible endpoint (the paper: GPT-4o-mini)."""

    endpoint: HttpUrlNoCredentials = Field(max_length=1024, description="API base URL.")
    model: str = Field(min_length=1, max_length=255, description="Judge model name.")
    api_key_secret: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key."
    )


BenchmarkFormat = Literal["mathvista", "mathverse", "mmmath", "dynamath", "synthetic"]


class BenchmarkSpec(Schema):
    """An evaluation benchmark: which public schema it follows and where it is."""

    name: str = Field(
        max_length=40, pattern=DNS_LABEL, description="Unique name used in results and metrics."
    )
    format: BenchmarkFormat = Field(description="Field layout and scoring rules to apply.")
    data: DatasetRef = Field(description="Where the benchmark rows are.")
    predictions_only: bool = Field(
        default=False,
        description=(
            "Sample and extract answers without scoring (a split whose answers are withheld, "
            "such as MathVista test): the results hold the predictions file in the "
            "benchmark's submission format, and rows without an answer are kept."
        ),
    )


class EvalSettings(Schema):
    """Benchmark scoring (sampling defaults from the paper's evaluation)."""

    benchmarks: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Names from spec.data.benchmarks to score; empty means all of them.",
    )
    temperature: float = Field(default=0.6, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Sampling top_p.")
    max_tokens: int = Field(default=16000, ge=1, le=1_048_576, description="Maximum new tokens.")
    max_retries: int = Field(
        default=2, ge=0, le=20, description="Resample a completion that lacks </answer> this often."
    )
    backend: Literal["vllm", "hf"] = Field(default="vllm", description="Generation engine.")
    judge: JudgeSpec | None = Field(
        default=None, description="Optional LLM judge; rule-based scores are always reported."
    )
    include_baselines: bool = Field(
        default=False,
        description="Also score the base model, the SFT model and every PTST stage, side by side.",
    )
    format_instruction_for: list[str] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "Model labels (from models, e.g. base) whose prompts end with the output-format "
            "instruction the trained models learned (<think>..</think><answer> Final Answer: "
            "X </answer>), so rule-based extraction does not under-score a baseline; empty "
            "(the default) prompts every model with the benchmark's own text."
        ),
    )

