"""Where a stage's inputs come from: the model, storage, Secrets, data sets."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from ..schema import (
    DNS_SUBDOMAIN,
    SECRET_PREFIX,
    CelRule,
    HttpUrlNoCredentials,
    Schema,
    SourceNoCredentials,
    StorageUriNoCredentials,
    _no_secret_literal,
)


class SecretKeyRef(Schema):
    """A key inside a Kubernetes Secret in the run's namespace."""

    name: str = Field(
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Name of the Secret (in the run's namespace).",
    )
    key: str = Field(
        default="token",
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key within the Secret whose value is used.",
    )


class ModelSpec(Schema):
    """The model a stage starts from."""

    name: Annotated[SourceNoCredentials, AfterValidator(_no_secret_literal)] = Field(
        min_length=1,
        max_length=1024,
        description=(
            "Base model: a hub id (Qwen/Qwen2.5-VL-7B-Instruct) or a storage URI "
            "(s3://, pvc://, file://) of a saved model directory."
        ),
    )
    revision: str | None = Field(
        default=None, max_length=255, description="Hub revision (branch, tag or commit)."
    )
    token_secret: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a hub access token, exposed to stages as HF_TOKEN.",
    )
    processor: SourceNoCredentials | None = Field(
        default=None,
        max_length=1024,
        description="Processor/tokenizer source when it differs from the model's.",
    )
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        default="bfloat16", description="Weights dtype for training and generation."
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        default="sdpa", description="Attention kernel passed to transformers."
    )

    cel_rules = (
        CelRule(
            f"!self.name.matches('{SECRET_PREFIX}')",
            "name looks like a secret value; give the name of a Secret that holds it",
            ".name",
        ),
    )


class StorageSpec(Schema):
    """Where every stage's artifacts live: <uri>/<namespace>/<run>/<stage>/."""

    uri: StorageUriNoCredentials = Field(
        max_length=1024,
        description=(
            "Artifact root: s3://bucket/prefix, pvc://claim/path (mounted into every "
            "stage pod), or file:///path for local runs."
        ),
    )
    credentials_secret: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description=(
            "Name of a Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "optional AWS_SESSION_TOKEN) are given to stage pods as environment. "
            "Secret values are never accepted in the spec."
        ),
    )
    endpoint: HttpUrlNoCredentials | None = Field(
        default=None,
        max_length=1024,
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph, R2...).",
    )
    region: str | None = Field(
        default=None, max_length=64, pattern=r"^[a-z0-9-]+$", description="S3 region."
    )

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]


class ConversationFields(Schema):
    """Where a conversation-only data set keeps a question and its answer."""

    field: str = Field(
        default="conversations", min_length=1, max_length=255,
        description=(
            "Column holding the turns: ShareGPT from/value (human/gpt) or role/content "
            "(user/assistant) objects. The first user turn is the question (image markers "
            "removed), the last assistant turn the answer."
        ),
    )
    images: str = Field(
        default="image", min_length=1, max_length=255,
        description="Column holding the image path(s) (LLaVA-CoT-100k: image; Mulberry-SFT: images).",
    )


class DatasetRef(Schema):
    """A data set: hub name, local path (parquet, jsonl, json) or storage URI."""

    source: SourceNoCredentials = Field(
        min_length=1,
        max_length=1024,
        description="Hub data set name, or a path/URI to parquet, jsonl or json files.",
    )
    subset: str | None = Field(
        default=None, max_length=255, description="Hub configuration name, if any."
    )
    split: str = Field(
        default="train", min_length=1, max_length=255, description="Split to read."
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Rename map from this data set's column names to the ones the stage expects "
            "(for example {image: img, question: query, answer: label})."
        ),
    )
    limit: int | None = Field(
        default=None, ge=1, description="Read at most this many rows (after shuffling off)."
    )
    max_image_pixels: int = Field(
        default=8192 * 8192,
        ge=1,
        le=1_000_000_000,
        description=(
            "Rows with an image above this many pixels (width x height, read from the "
            "header) are skipped and counted as oversized_image, as are decompression "
            "bombs; the model's processor resizes far below this anyway."
        ),
    )
    image_roots: list[SourceNoCredentials] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Folders (paths, file://, pvc:// or s3:// URIs) where relative image paths of the "
            "rows are looked up, after the source's own folder, its data files' folders and the "
            "zip archives there (Vision-R1-cold: the LLaVA-CoT-100k and Mulberry-SFT images)."
        ),
    )
    conversation: ConversationFields | None = Field(
        default=None,
        description=(
            "Read a conversation-only data set (LLaVA-CoT-100k, Mulberry-SFT) as question, "
            "answer and images rows: for the bridge and RL readers."
        ),
    )

